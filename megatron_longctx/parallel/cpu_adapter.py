"""Run megatron-core on machines without CUDA: the one place that adapts it.

megatron-core 0.16 assumes CUDA in spots we cannot avoid by choosing other modules. On a machine
without CUDA, "the CUDA device" is taken to mean the CPU:

* ``torch.cuda.current_device()`` (device of DDP grad buffers, p2p shape exchange, distributed
  optimizer shards, checkpoint exchange) returns the CPU device.
* ``torch.cuda.synchronize()`` (p2p, checkpoint I/O) is a no-op: there is nothing to wait for.
* ``Tensor.cuda()`` (tied-embedding sync, optimizer state reload) returns the tensor itself.
* ``Tensor.type()`` reports ``torch.cuda.FloatTensor`` (Half, BFloat16) for CPU floats: the
  optimizers and grad clipping pick their fp32/fp16 path by comparing these names.
* Modules that create tensors with a literal ``device="cuda"`` (listed in
  ``_MODULES_WITH_CUDA_LITERALS``) see a ``torch`` whose factories read that as CPU.
* The "CUDA" RNG that megatron-core's tensor-parallel RNG tracker forks (dropout regions,
  sequence-parallel embedding) is the CPU generator: ``torch.cuda.get_rng_state``,
  ``torch.cuda.manual_seed`` and the tracker's state get/set use it, so
  ``model_parallel_cuda_manual_seed`` works unchanged.

The pieces megatron-core lets us replace through its spec (core attention, rotary embedding,
norms) are replaced in ``megatron_longctx.model`` instead of being adapted here.

Nothing is touched when CUDA is available; :func:`adapt_megatron_core_for_cpu` then returns an
empty list. What it changes is logged once.
"""

from __future__ import annotations

import importlib
import logging
import types

import torch

logger = logging.getLogger(__name__)

_applied: list[str] | None = None

_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex/TE)
)

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}

_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "empty_like", "zeros_like")


class _TorchWithCudaLiteralsOnCpu(types.ModuleType):
    """``torch`` as seen by one megatron-core module, with ``device="cuda"`` read as CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name not in _FACTORIES:
            return value

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return value(*args, **kwargs)

        return factory


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_op(*args, **kwargs) -> None:
    return None


def _tensor_cuda_identity(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return self


_original_tensor_type = torch.Tensor.type


def _tensor_type_cuda_names(self: torch.Tensor, *args, **kwargs):
    name = _original_tensor_type(self, *args, **kwargs)
    if args or kwargs:  # a conversion, not a query
        return name
    return _CUDA_TYPE_NAMES.get(name, name)


def _get_cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def adapt_megatron_core_for_cpu() -> list[str]:
    """Adapt megatron-core to run on CPU when CUDA is absent. Idempotent.

    Returns the list of adaptations applied (empty when CUDA is available).
    """
    global _applied
    if torch.cuda.is_available():
        return []
    if _applied is not None:
        return _applied

    applied = []
    torch.cuda.current_device = _cpu_current_device
    applied.append("torch.cuda.current_device() -> cpu")
    torch.cuda.synchronize = _no_op
    applied.append("torch.cuda.synchronize() -> no-op")
    torch.Tensor.cuda = _tensor_cuda_identity
    applied.append("Tensor.cuda() -> itself")
    torch.Tensor.type = _tensor_type_cuda_names
    applied.append("Tensor.type() -> torch.cuda.* names")
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.get_rng_state = _get_cpu_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    tp_random._get_cuda_rng_state = _get_cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state
    applied.append("CUDA RNG (TP RNG tracker) -> CPU generator")
    for module_name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(module_name)
        module.torch = _TorchWithCudaLiteralsOnCpu()
    applied.append(f'device="cuda" -> cpu in {len(_MODULES_WITH_CUDA_LITERALS)} modules')

    _applied = applied
    logger.info("CUDA not available; adapted megatron-core for CPU: %s", "; ".join(applied))
    return applied
