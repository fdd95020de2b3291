"""examples/slurm/pretrain.sbatch on a real Slurm cluster, with CPU settings and 2 tasks: the job
trains, checkpoints, takes a USR1 (as Slurm sends before the time limit), saves, exits and is
requeued; the requeued job resumes from that checkpoint and finishes. Also: the script's usage
example is a valid layout, and our node-list parser agrees with scontrol."""

import json
import os
import re
import shlex

import pytest

from megatron_longctx.parallel.initialize import first_host
from megatron_longctx.training import exit_status
from megatron_longctx.training.checkpoint import latest_step

from distributed import ROOT, free_port

SCRIPT = os.path.join(ROOT, "examples", "slurm", "pretrain.sbatch")
ITERATIONS = 200
SAVE_INTERVAL = 50  # the first run is signalled after its first checkpoint
# What the test machines have instead of the script's GPU settings (sbatch options override
# the script's #SBATCH lines).
CPU_SETTINGS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                "--time=10"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
        "--data-path", "stdlib", "--log-interval", "10"]


def test_preempted_job_saves_requeues_and_resumes(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    assert cluster.cpus >= 2, f"the test needs 2 CPUs for 2 tasks, slurmd -C says {cluster.cpus}"
    os.makedirs(tmp_path / "logs")  # Slurm opens --output before the script runs
    save = str(tmp_path / "ckpt")
    job = cluster.sbatch(*CPU_SETTINGS, SCRIPT, *TINY, "--train-iters", str(ITERATIONS),
                         "--save", save, "--load", save, "--save-interval", str(SAVE_INTERVAL),
                         cwd=str(tmp_path),
                         env={"VENV": os.path.join(ROOT, ".venv"), "OMP_NUM_THREADS": "1",
                              "MASTER_PORT": str(free_port())})
    log_path = tmp_path / "logs" / f"longctx-{job}.out"

    def log() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    def state() -> str:
        return cluster.job(job)["JobState"]

    def first_checkpoint() -> bool:
        if state() not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} is {state()} before checkpointing:\n{log()}")
        return os.path.isdir(save) and (latest_step(save) or 0) >= SAVE_INTERVAL

    cluster.wait_for(first_checkpoint, 240, "the first checkpoint", details=log)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    def done() -> bool:
        info = cluster.job(job)
        if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job}: {info['JobState']}\n{log()}")
        return info["JobState"] == "COMPLETED"

    cluster.wait_for(done, 300, f"job {job} to be requeued and to complete", details=log)
    info, text = cluster.job(job), log()
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    # first run: the USR1 reached the ranks, which saved at the iteration they agreed on
    assert "USR1: the training step saves a checkpoint and exits" in text, text[-4000:]
    stopped = re.search(rf"stopped at iteration (\d+)/{ITERATIONS}: signal", text)
    assert stopped, text[-4000:]
    interrupted = int(stopped.group(1))
    assert SAVE_INTERVAL <= interrupted < ITERATIONS
    assert "exit_reason: signal" in text and f"requeueing job {job}" in text
    # second run (the log is appended): resumed there and finished
    second = text[text.index("(restart 1)"):]
    assert f"resumed {save}/iter_{interrupted:07d}: starting at iteration {interrupted}" \
        in second, second[-4000:]
    assert f"stopped at iteration {ITERATIONS}/{ITERATIONS}: finished" in second
    assert "exit_reason: finished" in second and "requeueing" not in second
    assert re.search(r"^\d+: ", second, re.M), "srun --label prefixes each task's lines"
    assert latest_step(save) == ITERATIONS
    assert open(os.path.join(save, "exit_reason")).read().strip() == "finished"
    assert os.path.isdir(os.path.join(save, f"iter_{interrupted:07d}"))
    # every iteration trained once across the two runs
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    logged = sorted(r["iteration"] for r in rows)
    assert len(logged) == len(set(logged)) and logged[-1] == ITERATIONS
    assert interrupted in logged  # the stop is logged (and saved) by the first run


def _usage_example() -> tuple[int, list[str]]:
    """Ranks and pretraining flags of the script's header example (nodes x ntasks-per-node)."""
    text = open(SCRIPT).read()
    line = re.search(r"^#\s+sbatch (.*examples/slurm/pretrain\.sbatch .*)$", text, re.M).group(1)
    words = shlex.split(line)
    nodes = int(words[words.index("--nodes") + 1])
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1))
    return nodes * per_node, words[words.index("examples/slurm/pretrain.sbatch") + 1:]


def test_usage_example_is_a_valid_layout(monkeypatch, capsys):
    """What the script checks before starting the step, for the example it shows: the recipe's
    layout fits the ranks, and the run saves and resumes from one directory."""
    ranks, flags = _usage_example()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SLURM_NTASKS", str(ranks))
    assert exit_status.main(flags) == 0
    assert capsys.readouterr().out.strip() == "runs/llama2_7b_harpe"  # the recipe's save
    monkeypatch.setenv("SLURM_NTASKS", str(ranks - 8))  # one node fewer: TP*CP does not divide
    with pytest.raises(SystemExit, match="world size 24 is not divisible by TP"):
        exit_status.main(flags)


def test_first_host_agrees_with_scontrol(slurm_cluster):
    # ("node[1-4]-ib", a suffix after the brackets: Slurm 22.05 rejects it; newer ones accept
    # it, and test_initialize.py covers it)
    for nodelist in ["localhost", "gpu[007-009,011],cpu1", "rack[1-2]-n[01-04]",
                     "a[3-4]b[05-06],c"]:
        hosts = slurm_cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()
        assert first_host(nodelist) == hosts[0], nodelist
