"""Context parallelism with megatron-core's load-balanced layout, on any backend.

The sequence is cut into ``2 * cp`` chunks of ``C = s / (2 cp)`` tokens; CP rank ``r`` holds
chunks ``r`` and ``2 cp - 1 - r`` (one early, one late chunk, so causal work is balanced), the
layout of megatron-core's ``get_batch_on_this_cp_rank``. Attention all-gathers keys and values
(Llama-3 style) into global order; the backward pass sums key/value gradients over CP ranks and
hands each rank the gradients of its own chunks. With ``--cp-partition document`` each
document is chunked instead (:mod:`.document_partition`); the gather then reorders by index.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_longctx.model.document_partition import (
    DocumentLayout,
    gathered_to_global,
    global_to_local,
)


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


def _rows(t: Tensor, index: Tensor, rows: int) -> Tensor:
    """Rows ``index`` of ``t [n, b, ...]`` flattened over ``(n, b)``, as ``[rows, b, ...]``."""
    flat = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
    return flat.index_select(0, index).view(rows, *t.shape[1:])


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, group, documents) -> Tensor:
        ctx.group, ctx.documents = group, documents
        size = dist.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        if documents is None:
            return _global_order(parts, size)
        order = gathered_to_global(documents, local.device)
        return _rows(torch.cat(parts, dim=0), order, size * local.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        # every rank's queries contribute to every key: sum, then keep our rows
        dist.all_reduce(grad, group=group)
        if ctx.documents is not None:
            mine = global_to_local(ctx.documents, rank, grad.device)
            return _rows(grad, mine, grad.shape[0] // size), None, None
        chunks = grad.chunk(2 * size, dim=0)
        first, second = chunk_ids(rank, size)
        return torch.cat([chunks[first], chunks[second]], dim=0), None, None


def gather_sequence(local: Tensor, group, documents: list[DocumentLayout] | None = None
                    ) -> Tensor:
    """``[s / cp, b, ...]`` local rows -> ``[s, b, ...]`` in global order (autograd-aware):
    the sample-level chunks, or each sample's per-document layout (``documents``)."""
    return _GatherSequence.apply(local, group, documents)
