"""Checkpoints with megatron-core's ``dist_checkpointing``: resumable and reshardable.

Layout (Megatron-LM's): ``{root}/iter_{step:07d}/`` and the tracker file
``{root}/latest_checkpointed_iteration.txt``.
Each rank writes its shards; the directory is written as ``iter_*.tmp`` and renamed only after
every rank has finished, and the tracker file is replaced atomically afterwards, so an
interrupted save never becomes the checkpoint a resume picks up. Model and optimizer state are
saved as global (unsharded-view) tensors, so a run can resume under another TP/PP/DP layout
(distributed-optimizer state: see ``_sharded_state``).
The learning rate and the data position are pure functions of the step (no extra state).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def _materialize_optimizer_state(optimizer) -> None:
    """Give every parameter its Adam state before loading into a fresh distributed optimizer.

    Without apex/TE, megatron-core's ``DistributedOptimizer.state_dict`` reads each
    parameter's ``step`` (torch's AdamW), which exists only after a first step; we take one
    step with zero gradients, learning rate and weight decay, so no parameter moves.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if len(inner.optimizer.state) > 0:
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.optimizer.param_groups]
        for g in inner.optimizer.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        inner._init_optimizer_states_with_dummy_values()
        for g, (lr, wd) in zip(inner.optimizer.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


def _restore_adamw_step(optimizer, step: int) -> None:
    """torch's AdamW counts steps per parameter (bias correction), in place. After a
    distributed-optimizer load, megatron-core 0.16 leaves one step tensor shared by every
    parameter, which AdamW would then advance once per parameter per step; give each
    parameter its own counter, set from the iteration (every iteration is one optimizer step:
    a non-finite step raises instead of skipping)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.full_like(state["step"], float(step))


def _sharded_state(trainer, is_loading: bool) -> dict:
    model = trainer.model.sharded_state_dict()
    kwargs = {}
    if trainer.cfg.parallel.use_distributed_optimizer:
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        # With apex/TE's FusedAdam the state reshards across every layout. torch's AdamW (CPU)
        # keeps a per-parameter "step" that megatron-core 0.16's fully reshardable format
        # drops on load, so there the state reshards across DP sizes only.
        sharding = "fully_reshardable" if HAVE_APEX_OR_TE else "dp_reshardable"
        kwargs["metadata"] = {"distrib_optim_sharding_type": sharding}
        if is_loading:
            _materialize_optimizer_state(trainer.optimizer)
    optimizer = trainer.optimizer.sharded_state_dict(model, is_loading=is_loading, **kwargs)
    return {"model": model, "optimizer": optimizer}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(trainer, root: str, extra: dict | None = None) -> str:
    """Save model + optimizer at ``trainer.step``; returns the checkpoint directory."""
    final = step_dir(root, trainer.step)
    tmp = final + ".tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted earlier
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(_sharded_state(trainer, is_loading=False), tmp)
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump({"step": trainer.step, "config": trainer.cfg.to_dict(), **(extra or {})},
                      f, indent=1)
        if os.path.isdir(final):  # re-saving a step: never leave the tracker without a target
            stale = final + ".replaced"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(trainer.step))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def latest_step(root: str) -> int | None:
    """The step recorded in the tracker file, or None when ``root`` has no checkpoint yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    try:
        step = int(text)
    except ValueError:
        raise ValueError(f"{tracker} should hold an iteration number, found {text!r}; fix or "
                         f"delete it (checkpoints are the iter_* directories beside it)") from None
    if not os.path.isdir(step_dir(root, step)):
        raise FileNotFoundError(f"{tracker} points at iteration {step} but "
                                f"{step_dir(root, step)} is missing")
    return step


def load_checkpoint(trainer, root: str) -> bool:
    """Load the latest checkpoint under ``root`` into the trainer; False if there is none."""
    step = latest_step(root)
    if step is None:
        return False
    with torch.no_grad():  # the optimizer copies into views of parameters
        state = dist_checkpointing.load(_sharded_state(trainer, is_loading=True),
                                        step_dir(root, step))
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.cfg.parallel.use_distributed_optimizer:
            _restore_adamw_step(trainer.optimizer, step)
    trainer.step = step
    logger.info("resumed from %s (step %d)", step_dir(root, step), step)
    return True
