"""FlexAttention (``torch.nn.attention.flex_attention``) for packed documents and context
parallelism: the GPU kernel for :func:`.blockwise_attention.document_causal_attention`'s cases.

The mask is the same: query row ``r`` (global position ``g(r)``: CP ranks hold two chunks at
offsets) sees key ``k`` when ``k <= g(r)`` and both are in the same document. It is handed to
the kernel as a ``BlockMask`` built per micro-batch from the document starts at block level,
without ever evaluating ``s x s`` pairs: a (query block, key block) pair is *empty* when every
key follows every query or their documents cannot meet, *full* when every key precedes every
query within one document (no mask evaluated), else *partial* (``mask_mod`` per element).
The kernel is compiled once per process on CUDA (torch caches a graph per shape); elsewhere
the eager implementation runs. torch has no FlexAttention backward on CPU: there it serves
evaluation and generation, and tests compare it with the blockwise path and a float64
reference.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 128  # FlexAttention's default block size on both axes


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_ids(doc_starts: list[list[int]] | None, batch: int, length: int,
                 device) -> Tensor:
    """``[b, length]`` int32: the index of each position's document (0 without starts)."""
    ids = torch.zeros(batch, length, dtype=torch.int32, device=device)
    for b, starts in enumerate(doc_starts or []):
        inner = [s for s in starts if 0 < s < length]
        ids[b, inner] = 1
    return ids.cumsum(dim=1, dtype=torch.int32)


def global_rows(query_chunks: list[tuple[int, int, int]], length: int, device) -> Tensor:
    """``[length]`` int64: the global position of each local query row."""
    rows = torch.empty(length, dtype=torch.int64, device=device)
    for local_start, local_end, global_start in query_chunks:
        rows[local_start:local_end] = torch.arange(global_start,
                                                   global_start + local_end - local_start,
                                                   device=device)
    return rows


def _block_bounds(values: Tensor, blocks: int) -> tuple[Tensor, Tensor]:
    """Min and max of ``values [..., n]`` over consecutive blocks of ``BLOCK`` (the last
    block padded with its last value): ``[..., blocks]`` each."""
    pad = blocks * BLOCK - values.shape[-1]
    padded = torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad)], dim=-1)
    grouped = padded.reshape(*values.shape[:-1], blocks, BLOCK)
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def _as_block_lists(selected: Tensor) -> tuple[Tensor, Tensor]:
    """``selected [b, nq, nk]`` bool -> (counts ``[b, 1, nq]``, indices ``[b, 1, nq, nk]``,
    the selected key blocks first) as ``BlockMask.from_kv_blocks`` takes them."""
    counts = selected.sum(dim=-1, dtype=torch.int32)
    # a stable sort puts the selected blocks first, in increasing key-block order
    order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices
    return counts[:, None], order.to(torch.int32)[:, None]


def document_block_mask(query_chunks: list[tuple[int, int, int]],
                        doc_starts: list[list[int]] | None, batch: int, sq: int, sk: int,
                        device):
    """The ``BlockMask`` of document-causal attention for ``sq`` local rows at the global
    offsets of ``query_chunks`` against ``sk`` keys in global order."""
    from torch.nn.attention.flex_attention import BlockMask

    docs = document_ids(doc_starts, batch, sk, device)  # [b, sk]
    rows = global_rows(query_chunks, sq, device)  # [sq]
    nq, nk = -(-sq // BLOCK), -(-sk // BLOCK)
    q_first, q_last = _block_bounds(rows, nq)  # [nq]
    k_first = torch.arange(nk, device=device) * BLOCK  # [nk]
    k_last = torch.clamp(k_first + BLOCK - 1, max=sk - 1)
    q_doc_lo, q_doc_hi = _block_bounds(docs[:, rows], nq)  # [b, nq]
    k_doc_lo, k_doc_hi = _block_bounds(docs, nk)  # [b, nk]
    q_first, q_last = q_first[None, :, None], q_last[None, :, None]
    k_first, k_last = k_first[None, None, :], k_last[None, None, :]
    q_doc_lo, q_doc_hi = q_doc_lo[:, :, None], q_doc_hi[:, :, None]
    k_doc_lo, k_doc_hi = k_doc_lo[:, None, :], k_doc_hi[:, None, :]
    empty = (k_first > q_last) | (k_doc_hi < q_doc_lo) | (k_doc_lo > q_doc_hi)  # [b, nq, nk]
    full = (k_last <= q_first) & (q_doc_lo == q_doc_hi) & (k_doc_lo == k_doc_hi) & \
        (q_doc_lo == k_doc_lo)
    partial = ~empty & ~full

    def mask_mod(b, h, q_idx, kv_idx):
        g = rows[q_idx]
        return (kv_idx <= g) & (docs[b, g] == docs[b, kv_idx])

    counts, indices = _as_block_lists(partial)
    full_counts, full_indices = _as_block_lists(full)
    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices,
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(sq, sk))


@functools.cache
def _compiled_kernel():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(query: Tensor, key: Tensor, value: Tensor, scale: float,
                            query_chunks: list[tuple[int, int, int]],
                            doc_starts: list[list[int]] | None) -> Tensor:
    """``document_causal_attention`` on FlexAttention: query ``[sq, b, np, hn]`` (this rank's
    rows), key/value ``[sk, b, ng, hn]`` in global order -> ``[sq, b, np * hn]``."""
    from torch.nn.attention.flex_attention import flex_attention

    sq, batch, heads, dim = query.shape
    if query.device.type == "cpu" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value)):
        raise RuntimeError("FlexAttention has no backward pass on CPU in torch; train on CPU "
                           "with --attention-backend auto (blockwise flash attention)")
    mask = document_block_mask(query_chunks, doc_starts, batch, sq, key.shape[0],
                               query.device)
    kernel = _compiled_kernel() if query.is_cuda else flex_attention
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
    out = kernel(q, k, v, block_mask=mask, scale=scale,
                 enable_gqa=k.shape[1] != heads)  # [b, np, sq, hn]
    return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * dim)
