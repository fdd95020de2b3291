"""``--profile``: torch.profiler over chosen iterations, as Megatron-LM's
``--use-pytorch-profiler`` (on CPU too; on GPUs with CUDA activity).

Iterations ``[--profile-step-start, --profile-step-end)`` of this launch are recorded on the
ranks in ``--profile-ranks``; the trace (``*.pt.trace.json``, for TensorBoard's profiler plugin
or chrome://tracing / Perfetto) goes to ``--tensorboard-dir``, else ``<save>/profile``.
"""

from __future__ import annotations

import logging
import os

import torch

from megatron_longctx.config import RunConfig

logger = logging.getLogger(__name__)


def build_profiler(cfg: RunConfig, rank: int) -> torch.profiler.profile | None:
    """The started profiler of this rank (call ``step()`` after each iteration and ``stop()``
    at the end), or None when this rank does not profile."""
    log = cfg.logging
    if not log.profile or rank not in log.profile_ranks:
        return None
    directory = log.tensorboard_dir or os.path.join(cfg.checkpoint.save, "profile")
    start, end = log.profile_step_start, log.profile_step_end
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        # Megatron-LM's schedule: iterations before start wait, one warms up, then record
        schedule=torch.profiler.schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0,
                                         active=end - start, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(directory),
        record_shapes=True)
    profiler.start()
    logger.info("--profile: iterations %d-%d of this launch, trace to %s", start, end - 1,
                directory)
    return profiler
