"""Bad training and checkpoint inputs (issue 18): a mistyped ``--load`` never overwrites a run,
a damaged checkpoint or another model shape is one line naming the file or the flag, and the
checkpoint flags' ranges are checked. One tiny saved run serves the cases that load weights."""

import hashlib
import logging
import os
import shutil
import struct
import zipfile

import pytest
from test_continual import TINY, metrics, pretrain

from megatron_longctx.arguments import parse_stages
from megatron_longctx.training.checkpoint import TRACKER, completed_steps, latest_step, step_dir


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> str:
    """A finished 4-iteration run with checkpoints at iterations 2 and 4."""
    save = str(tmp_path_factory.mktemp("bad_inputs") / "runA")
    pretrain("--train-iters", "4", "--save-interval", "2", "--save", save)
    assert completed_steps(save) == [2, 4]
    return save


def snapshot(root: str) -> dict:
    """Every file's bytes and every entry's mtime under ``root``."""
    state = {}
    for where, _, files in os.walk(root):
        state[where] = os.stat(where).st_mtime_ns
        for name in files:
            path = os.path.join(where, name)
            with open(path, "rb") as f:
                state[path] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return state


def config(*args: str):
    [cfg], _ = parse_stages([*TINY, "--train-iters", "4", *args])
    return cfg


# --- 1. a mistyped --load never overwrites a run (end to end, as a user runs it) -------------

def test_mistyped_load_refuses_and_leaves_the_run_untouched(run_a):
    before = snapshot(run_a)
    typo = run_a[:-1] + "a"  # runA -> runa
    proc = pretrain("--train-iters", "8", "--save", run_a, "--load", typo, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --save ") and "Traceback" not in proc.stderr
    for part in (f"--save {run_a} already holds another run's checkpoints (iterations 2, 4)",
                 f"--load {typo} does not exist", f"pass --load {run_a}", "--override-save"):
        assert part in last, last
    assert snapshot(run_a) == before  # not a byte nor an mtime changed
    assert not os.path.exists(typo)


def test_override_save_starts_over(run_a, tmp_path):
    save = str(tmp_path / "runA")
    shutil.copytree(run_a, save)
    pretrain("--train-iters", "2", "--lr-warmup-iters", "1", "--save", save, "--override-save")
    assert completed_steps(save) == [2] and latest_step(save) == 2  # iter 4 of the old run: gone
    assert sorted(metrics(save)) == [1, 2]


# --- where a run starts, and what it may overwrite (no weights read) -------------------------

@pytest.fixture
def dirs(tmp_path) -> dict:
    """``A`` and ``B``: two runs' save directories (checkpoints 2 and 4, tracker at 4); ``empty``:
    a directory without checkpoints; ``notracker``: checkpoints without a tracker; ``fresh`` and
    ``typo``: paths that do not exist."""
    paths = {name: str(tmp_path / name) for name in ("A", "B", "empty", "notracker", "fresh",
                                                     "typo")}
    for name in ("A", "B", "notracker"):
        for step in (2, 4):
            os.makedirs(step_dir(paths[name], step))
            open(os.path.join(step_dir(paths[name], step), "common.pt"), "w").close()
        if name != "notracker":
            (tmp_path / name / TRACKER).write_text("4")
    os.makedirs(paths["empty"])
    os.makedirs(step_dir(paths["A"], 6) + ".tmp")  # a save that was interrupted
    return paths


REFUSED = [  # (flags, substrings of the one-line error); {X}: the directories above
    (["--save", "{A}", "--load", "{typo}"],
     ["--save {A} already holds another run's checkpoints (iterations 2, 4)",
      "--load {typo} does not exist", "pass --load {A}", "--override-save"]),
    (["--save", "{A}"], ["--save {A} already holds", "no --load is given", "pass --load {A}"]),
    (["--save", "{A}", "--load", "{empty}"], ["--save {A}", "--load {empty} holds no checkpoint"]),
    (["--save", "{B}", "--load", "{A}"],
     ["--save {B} already holds", "this run resumes {A}/iter_0000004 (--load {A})"]),
    (["--save", "{A}", "--pretrained-checkpoint", "{B}"], ["--save {A}", "no --load is given"]),
    (["--save", "{A}", "--load", "{B}", "--finetune"],
     ["starts at iteration 0 from the weights of {B}/iter_0000004",
      "use --pretrained-checkpoint {B} --load {A} instead of --finetune"]),
    (["--save", "{fresh}", "--load", "{A}/iter_0000004", "--ckpt-step", "2"],
     ["--load {A}/iter_0000004 is the checkpoint of iteration 4", "--load {A} --ckpt-step 2"]),
    (["--save", "{fresh}", "--load", "{A}/iter_0000006.tmp"],
     ["--load {A}/iter_0000006.tmp is not a complete checkpoint", "--load {A} to resume"]),
    (["--save", "{fresh}", "--load", "{notracker}"],
     ["--load {notracker} has checkpoints (iterations [2, 4]) but no " + TRACKER,
      "--ckpt-step N"]),
    (["--save", "{fresh}", "--load", "{typo}", "--exit-on-missing-checkpoint"],
     ["--load {typo} holds no checkpoint and no --pretrained-checkpoint is given "
      "(--exit-on-missing-checkpoint): {typo} does not exist"]),
    (["--save", "{fresh}", "--load", "{A}", "--ckpt-step", "3"],
     ["--ckpt-step 3: {A}/iter_0000003 does not exist (complete checkpoints: [2, 4])"]),
]


@pytest.mark.parametrize("flags,expected", REFUSED,
                         ids=["typo", "no_load", "empty_load", "other_run", "pretrained_only",
                              "finetune", "iter_dir_and_step", "tmp_dir", "no_tracker",
                              "exit_on_missing", "missing_step"])
def test_bad_starting_points_are_one_line_errors(dirs, flags, expected):
    from megatron_longctx.training.starting_point import checkpoint_to_load

    before = {d: snapshot(dirs[d]) for d in ("A", "B")}
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        checkpoint_to_load(config(*[f.format(**dirs) for f in flags]))
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part.format(**dirs) in message, message
    assert {d: snapshot(dirs[d]) for d in ("A", "B")} == before


STARTS = [  # (flags, expected (checkpoint, weights only), a warning logged or None)
    (["--save", "{A}", "--load", "{A}"], ("{A}/iter_0000004", False), None),
    (["--save", "{A}", "--load", "{A}/iter_0000002"], ("{A}/iter_0000002", False), None),
    (["--save", "{fresh}", "--load", "{A}/iter_0000002/"], ("{A}/iter_0000002/", False), None),
    (["--save", "{fresh}", "--load", "{fresh}", "--pretrained-checkpoint", "{A}"],
     ("{A}/iter_0000004", True), "--load {fresh} holds no checkpoint yet: starting from {A}"),
    (["--save", "{fresh}", "--load", "{typo}"], (None, False),
     "WARNING: --load {typo} does not exist: starting from random weights"),
    (["--save", "{fresh}", "--load", "{empty}"], (None, False),
     "WARNING: --load {empty} holds no checkpoint: starting from random weights"),
    (["--save", "{A}", "--load", "{typo}", "--override-save"], (None, False),
     "WARNING: --override-save: the checkpoints of another run in --save {A} (iterations 2, 4)"),
]


@pytest.mark.parametrize("flags,expected,warning", STARTS,
                         ids=["resume", "rewind", "iter_dir", "pretrained_once", "typo_fresh_save",
                              "empty_fresh_save", "override_save"])
def test_starting_points(dirs, caplog, flags, expected, warning):
    from megatron_longctx.training.starting_point import checkpoint_to_load

    with caplog.at_level(logging.WARNING, logger="megatron_longctx"):
        path, weights_only = checkpoint_to_load(config(*[f.format(**dirs) for f in flags]))
    want_path, want_weights_only = expected
    assert (path, weights_only) == (want_path and want_path.format(**dirs), want_weights_only)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warning:
        assert any(warning.format(**dirs) in line for line in warned), warned
    else:
        assert not warned


# --- 2. a damaged checkpoint or another model shape: one line naming the file or flag --------

def _xor_bytes(ckpt: str) -> None:
    shard = os.path.join(ckpt, "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    for i in range(2000, len(data) - 2000, 97):
        data[i] ^= 0xFF
    open(shard, "wb").write(bytes(data))


def _poison_embedding(ckpt: str) -> None:
    """NaN bytes in the embedding's tensor data (each item is a torch.save zip archive whose
    records torch reads without checking their CRC)."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_longctx.training.checkpoint_files import _Window

    storage = FileSystemReader(ckpt).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn == "embedding.word_embeddings.weight")
    with open(os.path.join(ckpt, info.relative_path), "r+b") as f:
        archive = zipfile.ZipFile(_Window(f, info.offset, info.length))
        member = next(m for m in archive.infolist() if m.filename.endswith("/data/0"))
        f.seek(info.offset + member.header_offset)
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
        f.seek(info.offset + member.header_offset + 30 + name_length + extra_length)
        f.write(b"\xff" * 64)  # float32 NaNs


def _truncate(name: str):
    def damage(ckpt: str) -> None:
        path = os.path.join(ckpt, name)
        os.truncate(path, os.path.getsize(path) // 2)
    return damage


DAMAGED = [  # (how iteration 4 is damaged, substring naming the file)
    (_truncate("__0_0.distcp"), "{ckpt}/__0_0.distcp is truncated ("),
    (lambda c: os.remove(os.path.join(c, "__0_1.distcp")), "{ckpt}/__0_1.distcp is missing"),
    (lambda c: os.remove(os.path.join(c, "common.pt")), "{ckpt}/common.pt is missing"),
    (lambda c: os.remove(os.path.join(c, ".metadata")), "{ckpt}/.metadata is missing"),
    (_truncate("common.pt"), "cannot read {ckpt}/common.pt (RuntimeError: PytorchStreamReader"),
    (_xor_bytes, "cannot read {ckpt}/__0_0.distcp ("),
    (_poison_embedding, "the loaded weight embedding.word_embeddings.weight holds NaN"),
]


@pytest.mark.parametrize("damage,expected", DAMAGED,
                         ids=["truncated_shard", "missing_shard", "missing_common",
                              "missing_index", "truncated_common", "garbled_shard", "nan_bytes"])
def test_damaged_checkpoint_is_one_line_naming_the_file(run_a, tmp_path, single_process_group,
                                                        damage, expected):
    from megatron_longctx.training.run import prepare_stage

    save = str(tmp_path / "run")
    shutil.copytree(run_a, save)
    ckpt = step_dir(save, 4)
    damage(ckpt)
    with pytest.raises(ValueError) as err:
        prepare_stage(config("--save", save, "--load", save), world_size=1)
    message = str(err.value)
    assert "\n" not in message
    assert expected.format(ckpt=ckpt) in message, message
    assert f"resume from another checkpoint of {save} with --ckpt-step N (complete: 2)" in message


@pytest.mark.parametrize("flags,expected", [
    (["--hidden-size", "32"], "--hidden-size 64 there, 32 here"),
    (["--num-layers", "3"], "--num-layers 2 there, 3 here"),
    (["--ffn-hidden-size", "128"], "--ffn-hidden-size 176 there, 128 here"),
    (["--num-query-groups", "4"], "--num-query-groups 2 there, 4 here"),
    (["--kv-channels", "32"], "--kv-channels 16 there, 32 here"),
], ids=["hidden", "layers", "ffn", "groups", "kv_channels"])
def test_resume_with_another_shape_names_the_flag(run_a, tmp_path, single_process_group, flags,
                                                  expected):
    from megatron_longctx.training.run import prepare_stage

    cfg = config("--load", run_a, "--save", str(tmp_path / "elsewhere"), *flags)
    with pytest.raises(ValueError) as err:
        prepare_stage(cfg, world_size=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{step_dir(run_a, 4)} holds a model of another shape (")
    assert expected in message and "--use-checkpoint-args" in message, message
    assert message.count(" there, ") == 1  # only the flag given: no derived value repeated


def test_checkpoint_without_a_stored_config_is_checked_tensor_by_tensor(run_a, model_parallel):
    """A checkpoint whose ``args`` lack the model (another tool's) still names the flag, from
    its tensors' shapes, before any weight is read."""
    from megatron_longctx.config import ModelConfig, ParallelConfig
    from megatron_longctx.model import build_model
    from megatron_longctx.training.pretrained import check_checkpoint_shapes, check_saved_shape

    model_cfg = ModelConfig(num_layers=3, num_query_groups=2, vocab_size=258)
    check_saved_shape({}, model_cfg, step_dir(run_a, 4))  # nothing stored: nothing to compare
    with pytest.raises(ValueError, match="checkpoint .2, 64.*change --num-layers"):
        check_checkpoint_shapes(build_model(model_cfg, ParallelConfig()), step_dir(run_a, 4))


# --- 3. checkpoint and schedule flags out of range: refused before any work -------------------

@pytest.mark.parametrize("flags,expected", [
    (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    (["--save-interval", "0"], "--save-interval must be >= 1, got 0"),
    (["--finetune"], "--finetune loads weights from --load"),
    (["--exit-interval", "0"], "--exit-interval must be positive, got 0"),
    (["--lr-warmup-fraction", "1.5", "--lr-warmup-iters", "0"],
     "--lr-warmup-fraction must be in [0, 1), got 1.5"),
    (["--lr-warmup-fraction", "-0.1", "--lr-warmup-iters", "0"],
     "--lr-warmup-fraction must be in [0, 1), got -0.1"),
    (["--lr-warmup-init", "1e-2", "--lr", "1e-3"], "--lr-warmup-init 0.01 exceeds --lr 0.001"),
    (["--config", "{recipe}"], "a recipe with stages needs checkpoint.save (or --save)"),
], ids=["keep_last", "save_interval", "finetune", "exit_interval", "warmup_fraction_high",
        "warmup_fraction_negative", "warmup_init", "stages_without_save"])
def test_bad_flags_stop_before_any_work(tmp_path, flags, expected):
    from megatron_longctx.training.pretrain_tool import main

    recipe = tmp_path / "staged.yaml"
    recipe.write_text("stages:\n  - training: {train_iters: 2}\n  - training: {train_iters: 3}\n")
    argv = [*TINY, "--train-iters", "4", *[f.format(recipe=recipe) for f in flags]]
    # --world-size 2 (not the 1 process here): validation only, no process group is started
    with pytest.raises(SystemExit) as err:
        main([*argv, "--dry-run", "--world-size", "2"])
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message
    assert expected in message, message
