"""Which checkpoint a run starts from, and which checkpoints it may overwrite.

Megatron-LM's semantics: ``--load`` resumes its latest checkpoint (``--ckpt-step``: that
iteration; ``--finetune``: weights only); when ``--load`` holds none yet, the weights of
``--pretrained-checkpoint`` start the run, so one command both starts and resumes it.

One guard Megatron-LM lacks: a run never writes into a ``--save`` that already holds checkpoints
it does not resume. Without it a mistyped ``--load`` starts from scratch and replaces the real
run's checkpoints one save at a time. ``--override-save`` asks for exactly that: the old
checkpoints are deleted when training starts (after the model, data and weights are ready).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from megatron_longctx.config import CheckpointConfig, RunConfig
from megatron_longctx.training.checkpoint import (
    TRACKER,
    completed_steps,
    resolve_checkpoint,
    step_dir,
)

logger = logging.getLogger("megatron_longctx")

_ITER_DIR = re.compile(r"iter_(\d+)")


def holds_checkpoints(root: str | None) -> bool:
    """True when ``root`` has a tracker file or a complete ``iter_*`` directory."""
    return bool(root) and os.path.isdir(root) and (
        os.path.isfile(os.path.join(root, TRACKER)) or bool(completed_steps(root)))


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resumes(save: str | None, path: str | None) -> bool:
    """Whether checkpoint ``path`` is one of ``save``'s (resuming it, or rewinding it)."""
    return bool(save and path) and _same_dir(os.path.dirname(os.path.normpath(path)), save)


def _resolve_load(ck: CheckpointConfig) -> str | None:
    """``--load``'s checkpoint: a save root (its latest, or ``--ckpt-step``) or an ``iter_*``
    directory itself, as Megatron-LM users also give it; None when it holds none."""
    if not os.path.exists(ck.load):
        return None
    name = os.path.basename(os.path.normpath(ck.load))
    match = _ITER_DIR.fullmatch(name)
    if match or name.endswith(".tmp") and _ITER_DIR.fullmatch(name[:-4]):
        parent = os.path.dirname(os.path.normpath(ck.load)) or "."
        if not match or resolve_checkpoint(ck.load) is None:
            raise ValueError(f"--load {ck.load} is not a complete checkpoint (an interrupted "
                             f"save, or files missing); give its save directory --load {parent} "
                             f"to resume the latest complete one (--ckpt-step N: that one)")
        if ck.ckpt_step is not None and ck.ckpt_step != int(match.group(1)):
            raise ValueError(f"--load {ck.load} is the checkpoint of iteration "
                             f"{int(match.group(1))}, but --ckpt-step {ck.ckpt_step} is given; "
                             f"for another iteration pass --load {parent} --ckpt-step "
                             f"{ck.ckpt_step}")
        return ck.load
    steps = completed_steps(ck.load)
    if ck.ckpt_step is None and steps and not os.path.isfile(os.path.join(ck.load, TRACKER)):
        raise ValueError(f"--load {ck.load} has checkpoints (iterations {steps}) but no {TRACKER}"
                         f" saying which is the latest; pick one with --ckpt-step N")
    return resolve_checkpoint(ck.load, ck.ckpt_step)


def _refuse_foreign_save(ck: CheckpointConfig, path: str | None, weights_only: bool) -> None:
    """Raise unless this run resumes ``--save``'s own checkpoints, or ``--save`` holds none
    (or ``--override-save`` is given)."""
    if not holds_checkpoints(ck.save) or (not weights_only and resumes(ck.save, path)):
        return
    steps = completed_steps(ck.save)
    held = f"iterations {', '.join(map(str, steps))}" if steps else f"a {TRACKER}"
    if ck.override_save:
        logger.warning("WARNING: --override-save: the checkpoints of another run in --save %s "
                       "(%s) are deleted when training starts", ck.save, held)
        return
    if not ck.load:
        why = "no --load is given"
    elif path is None:
        why = (f"--load {ck.load} " + ("does not exist" if not os.path.exists(ck.load)
                                       else "holds no checkpoint"))
    elif weights_only:
        why = f"this run starts at iteration 0 from the weights of {path} (--load {ck.load})"
    else:
        why = f"this run resumes {path} (--load {ck.load})"
    resume = (f"pass --load {ck.save}" if not ck.finetune else
              f"use --pretrained-checkpoint {ck.load} --load {ck.save} instead of --finetune")
    raise ValueError(f"--save {ck.save} already holds another run's checkpoints ({held}) and "
                     f"{why}, so this run would overwrite them: to resume that run {resume}; "
                     f"to keep it, give another --save; to start over there, pass "
                     f"--override-save")


def checkpoint_to_load(cfg: RunConfig) -> tuple[str | None, bool]:
    """The checkpoint directory this run starts from, and whether it is weights only. Raises
    ``ValueError`` (one line) for a start that would overwrite checkpoints it does not resume."""
    ck = cfg.checkpoint
    if ck.finetune and ck.load and ck.save and _same_dir(ck.load, ck.save):
        raise ValueError("--finetune with --load equal to --save would restart from iteration 0 "
                         "at every relaunch; use --pretrained-checkpoint BASE --load SAVE --save "
                         "SAVE, which starts from BASE once and then resumes SAVE")
    path = _resolve_load(ck) if ck.load else None
    from_load, weights_only = path is not None, ck.finetune
    if not from_load:
        weights_only = True
        if ck.pretrained_checkpoint:
            path = resolve_checkpoint(ck.pretrained_checkpoint)
            if path is None:
                raise ValueError(f"--pretrained-checkpoint {ck.pretrained_checkpoint} holds no "
                                 f"checkpoint (no {TRACKER}); give the save directory of a "
                                 f"finished run (or a previous stage) or one of its iter_* "
                                 f"directories")
    _refuse_foreign_save(ck, path, weights_only)  # before the warning below: the real problem
    if ck.load and not from_load:
        _report_missing_load(ck, path)
    return path, path is not None and weights_only


def _report_missing_load(ck: CheckpointConfig, start: str | None) -> None:
    exists = os.path.exists(ck.load)
    if start is None and ck.exit_on_missing_checkpoint:
        raise ValueError(f"--load {ck.load} holds no checkpoint and no --pretrained-checkpoint "
                         f"is given (--exit-on-missing-checkpoint)"
                         + ("" if exists else f": {ck.load} does not exist"))
    origin = start or "random weights"
    if ck.save and _same_dir(ck.load, ck.save):  # the first launch of a resumable command
        logger.warning("--load %s holds no checkpoint yet: starting from %s", ck.load, origin)
    else:
        logger.warning("WARNING: --load %s %s: starting from %s, not from --load (check the "
                       "path; --exit-on-missing-checkpoint makes this an error)", ck.load,
                       "does not exist" if not exists else "holds no checkpoint", origin)


def start_over(save: str) -> None:
    """``--override-save``: delete the other run's checkpoints in ``save`` (tracker first, so an
    interruption here never leaves a tracker pointing at a deleted directory)."""
    if not holds_checkpoints(save):
        return
    tracker = os.path.join(save, TRACKER)
    if os.path.isfile(tracker):
        os.remove(tracker)
    for step in completed_steps(save):
        shutil.rmtree(step_dir(save, step))
    logger.info("--override-save: deleted the previous checkpoints in %s", save)
