"""Between full (TP=1, PP=1) tensors and this rank's shards.

Used to start any parallel layout from the same weights (parity tests, HF conversion) and to
gather sharded tensors (weights or grads) back to their full form. Names are the full model's
``state_dict`` names (``decoder.layers.{global_index}...``) as the local layer spec has them,
whichever spec built the model: the Transformer Engine spec's norms, held by the linears they
are fused into (``self_attention.linear_qkv.layer_norm_weight``), go by the norms' names
(``input_layernorm.weight``), so conversions and parity checks see one set of names.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state
from torch import Tensor

from megatron_longctx.model.layer_spec import TE_COMPATIBLE_KEYS_MAP

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_SPEC_NAMES = {te: local for local, te in TE_COMPATIBLE_KEYS_MAP.items()}


def _global_name(model: torch.nn.Module, local_name: str) -> str:
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer = model.decoder.layers[int(match.group(1))]
    rest = local_name[match.end():]
    for te, local in _LOCAL_SPEC_NAMES.items():  # the TE spec's fused norms
        if rest.startswith(te):
            rest = local + rest[len(te):]
    return f"decoder.layers.{layer.layer_number - 1}." + rest


def _is_glu_fc1(model: torch.nn.Module, name: str) -> bool:
    # megatron-core lays out the SwiGLU input projection as [gate; up] per TP rank, so a rank's
    # shard is [gate_r; up_r], not a contiguous slice of the full [gate; up]
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def local_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters keyed by their full-model names."""
    return {_global_name(model, n): p for n, p in model.named_parameters()}


def shard(model: torch.nn.Module, name: str, full: Tensor, param: Tensor) -> Tensor:
    """The slice of ``full`` that this TP rank holds for ``param``."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    if _is_glu_fc1(model, name):
        return torch.cat([part.chunk(size, dim=dim)[rank] for part in full.chunk(2, dim=dim)],
                         dim=dim)
    want = param.shape[dim] * size
    if full.shape[dim] > want:  # a vocabulary padded for another TP size: drop padding rows
        full = full.narrow(dim, 0, want)
    elif full.shape[dim] < want:  # e.g. an unpadded vocab
        pad = list(full.shape)
        pad[dim] = want - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def gather(model: torch.nn.Module, name: str, local: Tensor, param: Tensor) -> Tensor:
    """All-gather a TP-sharded ``local`` tensor shaped like ``param`` into its full form."""
    if not getattr(param, "tensor_model_parallel", False):
        return local
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return local
    dim = param.partition_dim
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    if _is_glu_fc1(model, name):
        gates, ups = zip(*(p.chunk(2, dim=dim) for p in parts))
        return torch.cat(list(gates) + list(ups), dim=dim)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: dict[str, Tensor]) -> None:
    """Copy full tensors into this rank's shards; every local parameter must be present."""
    params = local_parameters(model)
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, param in params.items():
        param.copy_(shard(model, name, full[name].to(param.dtype), param))


def full_tensors(model: torch.nn.Module, tensors: dict[str, Tensor] | None = None
                 ) -> dict[str, Tensor]:
    """Full (TP-gathered) tensors of this pipeline stage; default: the parameters themselves.

    ``tensors`` maps full-model names to local tensors shaped like the parameters (e.g. grads).
    """
    params = local_parameters(model)
    tensors = tensors if tensors is not None else {n: p.detach() for n, p in params.items()}
    return {n: gather(model, n, t, params[n]) for n, t in tensors.items()}
