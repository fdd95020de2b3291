"""Context parallelism with megatron-core's load-balanced layout, on any backend.

The sequence is cut into ``2 * cp`` chunks of ``C = s / (2 cp)`` tokens; CP rank ``r`` holds
chunks ``r`` and ``2 cp - 1 - r`` (one early, one late chunk, so causal work is balanced), the
layout of megatron-core's ``get_batch_on_this_cp_rank``. Attention all-gathers keys and values
(Llama-3 style) into global order; the backward pass sums key/value gradients over CP ranks and
hands each rank the gradients of its own chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_query_chunks(cp_rank: int, cp_size: int, local_len: int) -> list[tuple[int, int, int]]:
    """``(local_start, local_end, global_start)`` of this rank's two chunks."""
    c = local_len // 2
    first, second = chunk_ids(cp_rank, cp_size)
    return [(0, c, first * c), (c, 2 * c, second * c)]


def slice_for_cp_rank(t: Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> Tensor:
    """This rank's two chunks of a full-sequence tensor (sequence along ``dim``)."""
    if cp_size == 1:
        return t
    chunks = t.chunk(2 * cp_size, dim=dim)
    first, second = chunk_ids(cp_rank, cp_size)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def _global_order(parts: list[Tensor], cp_size: int) -> Tensor:
    """Rank-major gathered parts (each: its two chunks) -> chunks in sequence order."""
    chunks = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        a, b = part.chunk(2, dim=0)
        first, second = chunk_ids(rank, cp_size)
        chunks[first], chunks[second] = a, b
    return torch.cat(chunks, dim=0)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return _global_order(parts, size)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        # every rank's queries contribute to every key: sum, then keep our chunks
        dist.all_reduce(grad, group=group)
        chunks = grad.chunk(2 * size, dim=0)
        first, second = chunk_ids(rank, size)
        return torch.cat([chunks[first], chunks[second]], dim=0), None


def gather_sequence(local: Tensor, group) -> Tensor:
    """``[2C, ...]`` local chunks -> ``[2 cp C, ...]`` in global order (autograd-aware)."""
    return _GatherSequence.apply(local, group)
