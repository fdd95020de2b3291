"""Continual pretraining you can leave running, through tools/pretrain.py as users run it:
kill -9 and resume bitwise (TP=2; DP=2 with the distributed optimizer), a crash while saving
with --keep-last, SIGTERM, an injected NaN, and a two-stage recipe."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from test_schedule import closed_form

from megatron_longctx.training.checkpoint import completed_steps, latest_step

from distributed import ROOT, free_port

PRETRAIN = os.path.join(ROOT, "tools", "pretrain.py")
TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--log-interval", "1", "--data-path", "stdlib"]


def pretrain(*args: str, nproc: int = 1, fault: str | None = None, check: bool = True,
             timeout: int = 300, tiny: bool = True) -> subprocess.CompletedProcess:
    """Run tools/pretrain.py (under torchrun when ``nproc > 1``) in its own session.

    Output goes to files, not pipes, and the whole session is killed afterwards: a SIGKILLed
    rank leaves dist_checkpointing's helper process behind, holding inherited pipes open (on a
    cluster the job's cgroup ends it).
    """
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env.pop("MEGATRON_LONGCTX_FAULT", None)
    if fault:
        env["MEGATRON_LONGCTX_FAULT"] = fault
    cmd = [*launcher, PRETRAIN, *(TINY if tiny else []), *args]
    started = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if fault:
                _kill_orphaned_helpers(started)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def _kill_orphaned_helpers(since: float) -> None:
    """torchrun starts each rank in its own session, so a SIGKILLed rank's helper processes
    (dist_checkpointing's multiprocessing Manager) are re-parented to init, outside the group
    killed above: end those this test started."""
    import psutil

    for p in psutil.process_iter(["ppid", "create_time", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.info["ppid"] == 1 and p.info["create_time"] >= since - 1 and \
                    "multiprocessing" in " ".join(p.info["cmdline"] or []):
                p.kill()


def metrics(save) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    by_iteration = {r["iteration"]: r for r in rows}
    assert len(by_iteration) == len(rows), "an iteration appears twice"
    return by_iteration


def exit_reason(save) -> str:
    with open(os.path.join(save, "exit_reason")) as f:
        return f.read().strip()


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--use-distributed-optimizer"],  # DP=2
], ids=["tp2", "dp2_distopt"])
def test_kill_9_every_rank_then_resume_is_bitwise(tmp_path, layout):
    common = [*layout, "--train-iters", "6", "--save-interval", "2"]
    straight = str(tmp_path / "straight")
    pretrain(*common, "--save", straight, nproc=2)
    killed = str(tmp_path / "killed")
    args = [*common, "--save", killed, "--load", killed]
    proc = pretrain(*args, nproc=2, fault="iteration:3", check=False)
    assert proc.returncode != 0
    assert latest_step(killed) == 2 and max(metrics(killed)) == 3  # row 3 of the killed run
    pretrain(*args, nproc=2)
    resumed, reference = metrics(killed), metrics(straight)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for it in range(1, 7):  # bitwise: the same floats, not just close
        assert resumed[it]["lm_loss"] == reference[it]["lm_loss"], it
        assert resumed[it]["lr"] == reference[it]["lr"], it
    assert exit_reason(killed) == "finished"


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    save = str(tmp_path / "run")
    args = ["--train-iters", "6", "--save-interval", "2", "--keep-last", "1",
            "--save", save, "--load", save]
    proc = pretrain(*args, fault="save:4", check=False)
    assert proc.returncode == -signal.SIGKILL
    assert latest_step(save) == 2 and completed_steps(save) == [2]  # 4 never completed
    pretrain(*args)  # checkpoint 2 loads and the run finishes
    assert completed_steps(save) == [6] and latest_step(save) == 6  # keep-last 1
    assert sorted(metrics(save)) == [1, 2, 3, 4, 5, 6]


def test_async_save_publishes_before_exit_and_resumes_exactly(tmp_path):
    straight, staged = str(tmp_path / "straight"), str(tmp_path / "async")
    pretrain("--train-iters", "6", "--save", straight)
    args = ["--train-iters", "6", "--save-interval", "2", "--async-save", "--save", staged,
            "--load", staged]
    pretrain(*args, "--exit-interval", "3")  # async saves at 2 and 3; 3 complete before exit
    assert completed_steps(staged) == [2, 3] and exit_reason(staged) == "interval"
    pretrain(*args)
    resumed, reference = metrics(staged), metrics(straight)
    assert [resumed[i]["lm_loss"] for i in range(1, 7)] == \
        [reference[i]["lm_loss"] for i in range(1, 7)]


def test_sigusr1_is_recorded_like_sigterm():
    from megatron_longctx.training.loop import StopSignal

    stop = StopSignal(True)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    save = str(tmp_path / "run")
    args = [*TINY, "--train-iters", "2000", "--lr-decay-iters", "2000", "--exit-signal-handler",
            "--save", save, "--load", save]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, PRETRAIN, *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    path = os.path.join(save, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log.seek(0)
    output = log.read()
    log.close()
    assert proc.returncode == 0, output[-4000:]
    stopped = latest_step(save)
    assert 2 <= stopped < 2000 and exit_reason(save) == "signal"
    assert max(metrics(save)) == stopped
    pretrain(*args[len(TINY):], "--exit-interval", "1")  # one more iteration, then stop
    assert latest_step(save) == stopped + 1 and exit_reason(save) == "interval"
    assert sorted(metrics(save)) == list(range(1, stopped + 2))


def test_exit_duration_counts_from_the_job_start(tmp_path):
    save = str(tmp_path / "run")
    # 0.001 min: already past after start-up, so every rank agrees to stop after iteration 1
    pretrain("--train-iters", "50", "--exit-duration-in-mins", "0.001", "--save", save)
    assert latest_step(save) == 1 and exit_reason(save) == "duration"


def test_resume_refuses_silent_changes_and_no_load_optim_keeps_the_schedule(tmp_path):
    save = str(tmp_path / "run")
    args = ["--train-iters", "6", "--save", save, "--load", save]
    pretrain(*args, "--no-save-optim", "--exit-interval", "2")
    proc = pretrain(*args, check=False)
    assert proc.returncode != 0 and "--no-load-optim" in proc.stderr
    assert "Traceback" not in proc.stderr  # a one-line error, before any work
    proc = pretrain(*args, "--global-batch-size", "16", "--no-load-optim", check=False)
    assert proc.returncode != 0 and "trained with --global-batch-size 8" in proc.stderr
    pretrain(*args, "--no-load-optim")
    rows = metrics(save)
    for i in range(1, 7):  # iteration i applies the rate of i - 1 updates; 3.. continue it
        expect = closed_form(i - 1, style="linear", lr=3e-3, min_lr=0.0, warmup=2, decay=6)
        assert rows[i]["lr"] == pytest.approx(expect, rel=1e-12, abs=1e-18), i


def test_train_samples_and_train_iters_runs_are_identical(tmp_path):
    by_iters, by_samples = str(tmp_path / "iters"), str(tmp_path / "samples")
    pretrain("--train-iters", "4", "--save", by_iters)
    pretrain("--train-samples", "32", "--lr-warmup-iters", "0", "--lr-warmup-samples", "16",
             "--save", by_samples)
    a, b = metrics(by_iters), metrics(by_samples)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for i in a:
        assert (a[i]["lm_loss"], a[i]["lr"]) == (b[i]["lm_loss"], b[i]["lr"]), i


def test_injected_nan_stops_before_the_update_and_never_saves(tmp_path):
    save = str(tmp_path / "run")
    proc = pretrain("--train-iters", "6", "--save-interval", "2", "--save", save,
                    fault="nan:3", check=False)
    assert proc.returncode not in (0, -signal.SIGKILL)
    assert "iteration 3: lm loss is nan" in proc.stderr and "last good one" in proc.stderr
    assert completed_steps(save) == [2] and latest_step(save) == 2
    assert not os.path.exists(os.path.join(save, "exit_reason"))


RECIPE = """
model: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 176, num_attention_heads: 4,
        num_query_groups: 2, rope_parameters: {rope_type: default, rope_theta: 10000.0}}
training: {seq_length: 64, micro_batch_size: 2, global_batch_size: 4, train_iters: 3,
           lr: 3.0e-3, lr_warmup_iters: 1}
checkpoint: {save: SAVE}
data: {data_path: [stdlib]}
logging: {log_interval: 1, tensorboard_dir: TB}
stages:
  - {}
  - model: {max_position_embeddings: 256,
            rope_parameters: {rope_type: yarn, rope_theta: 10000.0, factor: 2.0,
                              original_max_position_embeddings: 64}}
    training: {seq_length: 128, train_iters: 2, lr: 1.0e-3}
"""


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.replace("SAVE", str(root / "run")).replace("TB", str(root / "tb")))
    first = pretrain("--config", str(recipe), tiny=False)
    written = {p: os.path.getmtime(p) for p in (root / "run").glob("stage_*/**/*")
               if p.is_file()}
    again = pretrain("--config", str(recipe), tiny=False)
    unchanged = all(os.path.getmtime(p) == t for p, t in written.items())
    return root, recipe, first.stderr, again.stderr, unchanged


def test_stages_run_in_order_and_rerun_skips_them(staged):
    root, _, first, again, unchanged = staged
    one, two = metrics(root / "run" / "stage_1"), metrics(root / "run" / "stage_2")
    assert sorted(one) == [1, 2, 3] and sorted(two) == [1, 2]
    assert two[1]["lr"] == 0.0 and two[2]["lr"] == 1.0e-3  # its own fresh warmup
    assert two[1]["consumed_samples"] == 4  # its own iteration count
    assert "rope: checkpoint default θ=10000 → this run yarn θ=10000 factor=2.0" in first
    assert "stage 1/2 already finished" in again and "stage 2/2 already finished" in again
    assert unchanged  # nothing retrained or rewritten
    assert exit_reason(root / "run") == "finished"  # the whole recipe


def test_stage_two_starts_from_stage_one_weights(staged, single_process_group):
    from megatron_longctx.config import load_stages
    from megatron_longctx.training.run import prepare_stage

    _, recipe, *_ = staged
    stage1, stage2 = load_stages(str(recipe))
    from megatron_longctx.config import chain_stages

    stage1, stage2 = chain_stages([stage1, stage2])
    end_of_one = prepare_stage(stage1, world_size=1)  # resumes stage 1's final checkpoint
    assert end_of_one.step == 3
    weights = {n: p.detach().clone() for n, p in end_of_one.model.named_parameters()}
    fresh = str(recipe.parent / "fresh")  # as before stage 2's first run
    stage2.checkpoint.load = stage2.checkpoint.save = fresh
    start_of_two = prepare_stage(stage2, world_size=1)
    assert start_of_two.step == 0 and start_of_two.scheduler.num_steps == 0
    assert start_of_two.optimizer.param_groups[0]["lr"] == 0.0  # warmup from 0
    assert all(len(o.optimizer.state) == 0 for o in
               getattr(start_of_two.optimizer, "chained_optimizers", [start_of_two.optimizer]))
    for name, param in start_of_two.model.named_parameters():
        assert torch.equal(param, weights[name]), name
    assert start_of_two.model.rotary.rope_parameters["rope_type"] == "yarn"


def test_shape_mismatch_names_the_flag_and_checkpoint_args_fix_it(staged, single_process_group):
    from megatron_longctx.config import load_stages
    from megatron_longctx.training.run import prepare_stage

    root, recipe, *_ = staged
    cfg = load_stages(str(recipe))[0]
    cfg.checkpoint.pretrained_checkpoint = str(root / "run" / "stage_1")
    cfg.model.ffn_hidden_size = 128
    with pytest.raises(ValueError, match="--ffn-hidden-size 176 there, 128 here"):
        prepare_stage(cfg, world_size=1)
    cfg.model.num_layers = 4
    with pytest.raises(ValueError, match="--num-layers 2 there, 4 here; --ffn-hidden-size"):
        prepare_stage(cfg, world_size=1)
    cfg.checkpoint.use_checkpoint_args = True
    trainer = prepare_stage(cfg, world_size=1)
    assert (cfg.model.num_layers, cfg.model.ffn_hidden_size) == (2, 176) and trainer.step == 0
    from convert.hf_models import write_tokenizer  # a 23-token word-level tokenizer

    write_tokenizer(str(root / "tok"))
    cfg.data.tokenizer_type, cfg.data.tokenizer_model = "HuggingFaceTokenizer", str(root / "tok")
    with pytest.raises(ValueError, match="258-token vocabulary, the tokenizer of this run has"):
        prepare_stage(cfg, world_size=1)


def test_metrics_reach_tensorboard(staged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, *_ = staged
    events = EventAccumulator(str(root / "tb" / "stage_1"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("lm loss")}
    jsonl = {**metrics(root / "run" / "stage_1")}
    assert set(jsonl) <= set(logged)
    for it, row in jsonl.items():
        assert logged[it] == pytest.approx(row["lm_loss"], rel=1e-6)
