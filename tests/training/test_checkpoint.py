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
