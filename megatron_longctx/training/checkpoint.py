"""Checkpoints with megatron-core's ``dist_checkpointing``: resumable and reshardable.

Layout (Megatron-LM's): ``{root}/iter_{step:07d}/`` and the tracker file
``{root}/latest_checkpointed_iteration.txt``.
Each rank writes its shards; the directory is written as ``iter_*.tmp`` and renamed only after
every rank has finished, and the tracker file is replaced atomically afterwards, so an
interrupted save never becomes the checkpoint a resume picks up. Model and optimizer state are
saved as global (unsharded-view) tensors, so a run can resume under another TP/PP/DP layout
(distributed-optimizer state: see ``_sharded_state``).

Besides the shards, the common part holds Megatron-LM's ``common.pt`` fields (``args``:
Megatron-LM's names plus our config, ``iteration``, ``checkpoint_version``,
``opt_param_scheduler``) and megatron-core's ``content_metadata`` (our schema version and the
layout it was written with); RNG states are saved per (PP, TP) rank. The data position is a pure
function of the iteration. Schema versions, how older checkpoints and Megatron-LM's load:
``checkpoint_schema.py``.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import random
import re
import shutil
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_longctx.training.checkpoint_files import check_finite, read_errors, verify_files
from megatron_longctx.training.checkpoint_schema import (
    CHECKPOINT_VERSION,
    SCHEMA,
    SCHEMA_VERSION,
    drop_absent_extra_state,
    load_model_state,
    megatron_lm_args,
    read_common,
    stored_keys,
)
from megatron_longctx.training.faults import maybe_fault

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


def _rng_state() -> dict:
    return {"random": random.getstate(), "np": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "cp": parallel_state.get_context_parallel_world_size()}


def _rng_object(state: dict | None) -> ShardedObject:
    # one entry per (PP, TP) rank, as Megatron-LM: DP/CP replicas hold the same state
    layout = _layout()
    return ShardedObject(
        "rng_state", state, (layout["pp"], layout["tp"]),
        (parallel_state.get_pipeline_model_parallel_rank(),
         parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _sharded_state(trainer, is_loading: bool, *, optim: bool = True, rng: bool = True,
                   keys_version: int = SCHEMA_VERSION) -> dict:
    # keys as the checkpoint (of schema ``keys_version``) stores them; the optimizer's keys are
    # derived from the model's, so they follow
    model = stored_keys(trainer.model.sharded_state_dict(), keys_version)
    state = {"model": model}
    if optim:
        kwargs = {}
        if trainer.cfg.parallel.use_distributed_optimizer:
            from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

            # With apex/TE's FusedAdam the state reshards across every layout. torch's AdamW
            # (CPU) keeps a per-parameter "step" that megatron-core 0.16's fully reshardable
            # format drops on load, so there the state reshards across DP sizes only.
            sharding = "fully_reshardable" if HAVE_APEX_OR_TE else "dp_reshardable"
            kwargs["metadata"] = {"distrib_optim_sharding_type": sharding}
            if is_loading:
                _materialize_optimizer_state(trainer.optimizer)
        state["optimizer"] = trainer.optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                                  **kwargs)
    if rng:
        state["rng_state"] = _rng_object(None if is_loading else _rng_state())
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(trainer, root: str, *, save_optim: bool = True, save_rng: bool = True,
                    keep_last: int | None = None, async_queue=None) -> str:
    """Save model (+ optimizer, scheduler, RNG) at ``trainer.step``; returns its directory.

    With ``keep_last`` older checkpoints are deleted once this one is complete. With
    ``async_queue`` (megatron-core's ``AsyncCallsQueue``, ``--async-save``) the shards are
    written by a background process and the checkpoint is renamed into place when every rank
    has finished, in ``async_queue.maybe_finalize_async_calls()``.
    """
    final = step_dir(root, trainer.step)
    tmp = final + ".tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted earlier
        os.makedirs(tmp)
    _barrier()
    if hasattr(trainer, "sync_parameters"):  # --overlap-param-gather leaves them stale
        trainer.sync_parameters()
    state = _sharded_state(trainer, is_loading=False, optim=save_optim, rng=save_rng)
    world = dist.get_world_size() if dist.is_initialized() else 1
    state.update(args=megatron_lm_args(trainer.cfg.to_dict(), trainer.step, world,
                                       save_optim=save_optim, save_rng=save_rng),
                 iteration=trainer.step, checkpoint_version=CHECKPOINT_VERSION)
    if save_optim:
        state["opt_param_scheduler"] = trainer.scheduler.state_dict()
    metadata = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **_layout(),
                "optimizer": save_optim, "rng": save_rng}
    finalize = partial(_publish, root, trainer.step, keep_last)
    if async_queue is None:
        with _in_process_results_queue():
            dist_checkpointing.save(state, tmp, content_metadata=metadata)
        finalize()
    else:
        request = dist_checkpointing.save(state, tmp, content_metadata=metadata,
                                          async_sharded_save=True)
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    return final


@contextmanager
def _in_process_results_queue():
    """megatron-core's file writer reports results through a queue served by a *spawned*
    ``multiprocessing.Manager`` (it re-imports the launching script: ~4 s, once per process).
    Only an async save needs a queue that crosses processes; a synchronous save writes from
    this process (its forked writers report through their own queue), so a plain queue
    serves."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:  # made by an earlier async save: keep it
        yield
        return
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = None


def save_weights(model, cfg, root: str, step: int = 0) -> str:
    """A weights-only checkpoint of ``model`` (built from ``cfg``) at ``step``, in the same
    format and with the same metadata as a training checkpoint: what a conversion writes and
    ``--pretrained-checkpoint`` / ``--finetune`` / ``load_model`` read."""
    return save_checkpoint(SimpleNamespace(model=model, cfg=cfg, step=step), root,
                           save_optim=False, save_rng=False)


def _publish(root: str, step: int, keep_last: int | None) -> None:
    """Once every rank has written its shards: rename ``iter_*.tmp`` into place, point the
    tracker at it, then delete what ``keep_last`` no longer keeps."""
    maybe_fault("save", step)
    _barrier()
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
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
            f.write(str(step))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        logger.info("saved checkpoint %s", final)
        if keep_last:  # never this checkpoint: a rewound run may have left later steps
            older = [s for s in completed_steps(root) if s < step]
            for stale_step in older[:max(len(older) - (keep_last - 1), 0)]:
                shutil.rmtree(step_dir(root, stale_step))
    _barrier()


def completed_steps(root: str) -> list[int]:
    """Iterations of the complete (renamed) checkpoints under ``root``, ascending."""
    steps = []
    for path in glob.glob(os.path.join(root, "iter_*")):
        match = re.fullmatch(r"iter_(\d+)", os.path.basename(path))
        if match and os.path.isdir(path):
            steps.append(int(match.group(1)))
    return sorted(steps)


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


def resolve_checkpoint(root: str, step: int | None = None) -> str | None:
    """The directory of iteration ``step`` (default: the latest) under ``root``; None when
    ``root`` holds no checkpoint. ``root`` may also be an ``iter_*`` directory itself."""
    if os.path.isfile(os.path.join(root, "common.pt")) or \
            os.path.isfile(os.path.join(root, "metadata.json")):
        return root
    if step is None:
        step = latest_step(root)
        if step is None:
            return None
    path = step_dir(root, step)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--ckpt-step {step}: {path} does not exist (complete "
                                f"checkpoints: {completed_steps(root)})")
    return path


def load_common(path: str) -> dict:
    """The common part of a checkpoint (``args``, ``iteration``, ``opt_param_scheduler``...),
    after checking its files against its index (every loader reads this first); ``args`` is our
    config dict and ``schema_version`` is set, whichever version or Megatron-LM wrote it."""
    verify_files(path)
    with read_errors(path, os.path.join(path, "common.pt")):
        common = dist_checkpointing.load_common_state_dict(path)
    return read_common(common)


def _check_resumable(trainer, common: dict, path: str, load_optim: bool) -> None:
    """Refuse a resume that would silently change the run, before anything is loaded."""
    meta = common.get("content_metadata") or {}
    if load_optim and not meta.get("optimizer", True):
        raise ValueError(f"{path} holds no optimizer state (saved with --no-save-optim); pass "
                         f"--no-load-optim to resume with a fresh optimizer, or start from its "
                         f"weights with --pretrained-checkpoint / --finetune")
    saved = ((common.get("args") or {}).get("training") or {}).get("global_batch_size")
    current = trainer.cfg.training.global_batch_size
    if saved is not None and saved != current:
        raise ValueError(f"{path} was trained with --global-batch-size {saved}, this run has "
                         f"{current}: the data position and schedule are counted in iterations "
                         f"of that size. Resume with --global-batch-size {saved}, or start a new "
                         f"stage from these weights with --pretrained-checkpoint.")


def load_checkpoint(trainer, path: str, *, load_optim: bool = True, load_rng: bool = True,
                    weights_only: bool = False) -> int:
    """Load the checkpoint in directory ``path`` into the trainer; returns its iteration.

    ``weights_only``: model weights only (``--pretrained-checkpoint``, ``--finetune``): the
    trainer keeps iteration 0, its fresh optimizer, schedule and RNG.
    """
    common = load_common(path)
    meta = common.get("content_metadata") or {}
    if weights_only:
        load_optim = load_rng = False
    else:
        _check_resumable(trainer, common, path, load_optim)
    if load_rng and (not meta.get("rng", True) or
                     (meta.get("tp"), meta.get("pp")) != (_layout()["tp"], _layout()["pp"])):
        load_rng = False  # saved without, or another (TP, PP) layout: as Megatron-LM, skip
        logger.info("checkpoint RNG state not restored (not saved or layout changed)")
    with torch.no_grad():  # the optimizer copies into views of parameters
        request = _sharded_state(trainer, is_loading=True, optim=load_optim, rng=load_rng,
                                 keys_version=common["schema_version"])
        with read_errors(path):
            request["model"] = drop_absent_extra_state(request["model"], path)  # TE <- local
            state = dist_checkpointing.load(request, path)
        load_model_state(trainer.model, state["model"])
        check_finite(trainer.model, path)
        if load_optim:
            trainer.optimizer.load_state_dict(state["optimizer"])
            if trainer.cfg.parallel.use_distributed_optimizer:
                _restore_adamw_step(trainer.optimizer, int(common["iteration"]))
    if weights_only:
        return 0
    trainer.step = int(common["iteration"])
    schedule = common.get("opt_param_scheduler") if load_optim else None
    if schedule is not None:
        from megatron_longctx.training.schedule import load_scheduler_state

        load_scheduler_state(trainer.scheduler, schedule)
    else:  # --no-load-optim (or a checkpoint from before schedules were saved): the schedule
        # continues at this iteration
        trainer.scheduler.step(increment=trainer.step * trainer.cfg.training.global_batch_size)
    if load_rng:
        _set_rng_state(state["rng_state"])
    logger.info("resumed from %s (iteration %d)", path, trainer.step)
    return trainer.step
