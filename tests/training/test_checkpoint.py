"""Checkpoint save/resume: a resumed run continues exactly; checkpoints reshard across layouts;
an interrupted save is never picked up."""

import json
import os

import pytest

from megatron_longctx.training.checkpoint import TRACKER, latest_step, step_dir

from distributed import run_torchrun

WORKER = os.path.join(os.path.dirname(__file__), "checkpoint_worker.py")


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run_torchrun(WORKER, 2, str(out))
    return json.loads((out / "losses.json").read_text())


@pytest.mark.parametrize("run,reference", [
    ("resumed", "uninterrupted"),  # TP=2 save -> TP=2 resume
    ("resharded", "uninterrupted"),  # TP=2 save -> PP=2 resume
    ("distopt_resumed", "distopt_uninterrupted"),  # DP=2 distributed optimizer
])
def test_resumed_run_continues_exactly(losses, run, reference):
    assert len(losses[run]) == 4
    for a, b in zip(losses[run], losses[reference]):
        assert a == pytest.approx(b, abs=1e-6)
    assert losses[run][3] < losses[run][0] - 0.3  # it trains


def test_latest_step_ignores_interrupted_saves(tmp_path):
    root = str(tmp_path)
    assert latest_step(root) is None
    os.makedirs(step_dir(root, 10) + ".tmp")  # a save that died before its rename
    assert latest_step(root) is None
    os.makedirs(step_dir(root, 5))
    (tmp_path / TRACKER).write_text("5")
    assert latest_step(root) == 5
    (tmp_path / TRACKER).write_text("7")
    with pytest.raises(FileNotFoundError, match="iteration 7"):
        latest_step(root)
    (tmp_path / TRACKER).write_text("latest")
    with pytest.raises(ValueError, match="should hold an iteration number"):
        latest_step(root)


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    """A rewound run (--ckpt-step, a reused directory) saves below steps already there."""
    from megatron_longctx.training.checkpoint import _publish, completed_steps

    root = str(tmp_path)
    for step in (2, 4, 6):
        os.makedirs(step_dir(root, step))
    os.makedirs(step_dir(root, 5) + ".tmp")
    _publish(root, 5, keep_last=2)
    assert completed_steps(root) == [4, 5, 6] and latest_step(root) == 5


def test_starting_point_semantics(tmp_path):
    from megatron_longctx.config import RunConfig, chain_stages
    from megatron_longctx.training.starting_point import checkpoint_to_load

    base, run = tmp_path / "base", tmp_path / "run"
    os.makedirs(step_dir(str(base), 7))
    (base / TRACKER).write_text("7")
    cfg = RunConfig()
    cfg.checkpoint.load = cfg.checkpoint.save = str(run)
    cfg.checkpoint.pretrained_checkpoint = str(base)
    cfg.checkpoint.exit_on_missing_checkpoint = True  # the pretrained weights are enough
    assert checkpoint_to_load(cfg) == (step_dir(str(base), 7), True)
    cfg.checkpoint.pretrained_checkpoint = None
    with pytest.raises(ValueError, match="holds no checkpoint and no --pretrained-checkpoint"):
        checkpoint_to_load(cfg)
    cfg.checkpoint.exit_on_missing_checkpoint = False
    assert checkpoint_to_load(cfg) == (None, False)  # random weights, with a warning
    cfg.checkpoint.finetune = True
    with pytest.raises(ValueError, match="restart from iteration 0 at every relaunch"):
        checkpoint_to_load(cfg)
    cfg.checkpoint.save = str(tmp_path / "elsewhere")
    cfg.checkpoint.load = str(base)
    assert checkpoint_to_load(cfg) == (step_dir(str(base), 7), True)  # finetune: weights only
    staged = [RunConfig(), RunConfig()]
    for c in staged:
        c.checkpoint.save, c.checkpoint.load = str(run), str(base)
    with pytest.raises(ValueError, match="stage 1: checkpoint.load"):
        chain_stages(staged)
