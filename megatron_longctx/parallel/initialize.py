"""Process groups from torchrun or Slurm, and megatron-core's model-parallel groups.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_JOB_NODELIST``
(the first host becomes the rendezvous address). Without either, this is a single process.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_longctx.config import ParallelConfig
from megatron_longctx.parallel.cpu_adapter import adapt_megatron_core_for_cpu

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list, as ``scontrol show hostnames`` expands it:
    ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``, ``"node[1-4]-ib"`` -> ``"node1-ib"``,
    ``"rack[1-2]-n[01-04]"`` -> ``"rack1-n01"``. (Job scripts set MASTER_ADDR from scontrol.)"""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())  # up to a top-level comma
    if not first:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    # each bracket holds ranges and numbers ("01-04,07"): its first host takes the first one
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first.group(0))


def distributed_env(environ: Mapping[str, str] = os.environ) -> DistributedEnv:
    """Read the launcher's environment: torchrun first, then Slurm, else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistributedEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1")
        return DistributedEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
            launcher="slurm",
        )
    return DistributedEnv(0, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"),
                          int(environ.get("MASTER_PORT", _free_port())), "single")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_cuda_device_max_connections(layouts: Iterable[ParallelConfig],
                                    environ: MutableMapping[str, str] = os.environ,
                                    cuda: bool | None = None) -> str | None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for CUDA runs with TP or CP > 1; returns the
    value in effect (None where nothing is needed).

    With one hardware work queue kernels start in launch order, so megatron-core's asynchronous
    TP all-gathers and reduce-scatters (launched just before the GEMM they overlap) and TE's CP
    exchange run beside the compute instead of after it. Megatron-LM asserts this setting for
    TP/CP > 1 (before Blackwell, where it is harmless). CUDA reads it when the context is
    created, so call this before ``torch.cuda.set_device``; a value the user exported stays.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda or not any(p.tensor_model_parallel_size > 1 or p.context_parallel_size > 1
                           for p in layouts):
        return None
    name = "CUDA_DEVICE_MAX_CONNECTIONS"
    if name not in environ:
        environ[name] = "1"
    elif environ[name] != "1":
        logger.warning("%s=%s: TP/CP communication may not overlap with compute "
                       "(megatron-core expects 1)", name, environ[name])
    return environ[name]


def init_process_group(env: DistributedEnv | None = None, timeout_minutes: int = 30,
                       backend: str | None = None) -> DistributedEnv:
    """Start ``torch.distributed`` (``--distributed-backend``: NCCL on GPUs and gloo on CPU by
    default; training passes ``--distributed-timeout-minutes``). Idempotent."""
    env = env or distributed_env()
    if dist.is_initialized():
        return env
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--distributed-backend nccl needs CUDA; use gloo on CPU machines")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    adapt_megatron_core_for_cpu()
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    # a process that exits with its groups alive can abort in interpreter finalization
    # ("terminate called without an active exception": gloo's threads outlive Python); every
    # tool and worker started here tears them down first (destroy is idempotent)
    atexit.register(destroy)
    logger.info("rank %d/%d up (%s, %s)", env.rank, env.world_size, backend, env.launcher)
    return env


def initialize_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Create megatron-core's TP/PP/CP/DP groups and seed every RNG.

    Call after validating the layout (``RunConfig.validate``); idempotent per layout.
    """
    from megatron.core import parallel_state

    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron-core's tensor-parallel RNG tracker.

    On CPU the tracker's "CUDA" generator is the CPU one (see ``cpu_adapter``).
    """
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_model_parallel() -> None:
    """Forget megatron-core's groups and destroy them. Its ``destroy_model_parallel`` only
    forgets most of them, and every gloo group keeps its TCP threads polling: a process that
    lays out its groups again (a tool or test run in-process) would pile up thousands of them."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return
    parallel_state.destroy_model_parallel()  # destroys the gloo DP groups it made itself
    world = dist.distributed_c10d._world  # every group made since init_process_group
    for group in list(world.pg_map):
        if group is not world.default_pg:
            dist.destroy_process_group(group)


def destroy() -> None:
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
