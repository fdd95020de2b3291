"""Exact causal attention for query pieces that see a key *prefix* plus a causal *diagonal* block.

Long-context attention needs three patterns that plain ``is_causal`` SDPA cannot express:
packed documents (a query sees only its own document), and context parallelism (a rank's query
chunk sits at a global offset and sees all earlier keys), and both together. Each reduces to
pieces of queries ``[a, b)`` of a document starting at ``s0``: keys ``[s0, a)`` are fully visible
(the prefix), keys ``[a, b)`` causally (the diagonal). We run flash attention on the two blocks
and merge them with their log-sum-exps (the ring/flash-attention recurrence); the backward pass
calls flash backward per block with the merged output and log-sum-exp, which makes every block's
gradient exact. Memory stays O(s): no ``s x s`` mask or score matrix is ever built.
"""

from __future__ import annotations

import torch
from torch import Tensor

_aten = torch.ops.aten


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
                   ) -> tuple[Tensor, Tensor, tuple]:
    """``[b, h, L, d]`` -> (out ``[b, h, L, d]``, lse ``[b, h, L]`` fp32, state for backward)."""
    if q.is_cuda:
        out, lse, cq, ck, mq, mk, seed, offset, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cq, ck, mq, mk, seed, offset)
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                 scale=scale)
    return out, lse, ()


def _flash_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    causal: bool, scale: float, state: tuple) -> tuple[Tensor, Tensor, Tensor]:
    if q.is_cuda:
        cq, ck, mq, mk, seed, offset = state
        return _aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, causal, scale=scale)


class _PrefixDiagonalAttention(torch.autograd.Function):
    """softmax over [prefix keys (all visible) ; diagonal keys (causal)] for queries ``q``."""

    @staticmethod
    def forward(ctx, q, k_pre, v_pre, k_diag, v_diag, scale):
        out_d, lse_d, state_d = _flash_forward(q, k_diag, v_diag, True, scale)
        if k_pre.shape[-2] == 0:
            out, lse, state_p = out_d, lse_d, ()
        else:
            out_p, lse_p, state_p = _flash_forward(q, k_pre, v_pre, False, scale)
            lse = torch.logaddexp(lse_p, lse_d)  # [b, h, L]
            out = (torch.exp(lse_p - lse)[..., None] * out_p
                   + torch.exp(lse_d - lse)[..., None] * out_d).to(q.dtype)
        ctx.save_for_backward(q, k_pre, v_pre, k_diag, v_diag, out, lse)
        ctx.scale, ctx.states = scale, (state_p, state_d)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_pre, v_pre, k_diag, v_diag, out, lse = ctx.saved_tensors
        state_p, state_d = ctx.states
        grad = grad.contiguous()
        dq, dk_d, dv_d = _flash_backward(grad, q, k_diag, v_diag, out, lse, True, ctx.scale,
                                         state_d)
        dk_p, dv_p = torch.zeros_like(k_pre), torch.zeros_like(v_pre)
        if k_pre.shape[-2] > 0:
            dq_p, dk_p, dv_p = _flash_backward(grad, q, k_pre, v_pre, out, lse, False, ctx.scale,
                                               state_p)
            dq = dq + dq_p
        return dq, dk_p, dv_p, dk_d, dv_d, None


def prefix_diagonal_attention(q: Tensor, k_pre: Tensor, v_pre: Tensor, k_diag: Tensor,
                              v_diag: Tensor, scale: float) -> Tensor:
    """All ``[b, h, L, d]`` (prefix may have length 0); returns ``[b, h, L, d]``.

    Inputs may be strided views (sequence slices, stride-0 expanded KV heads): the flash
    kernels read strides, so no copies are made or kept for backward.
    """
    if not q.is_cuda:
        return _PrefixDiagonalAttention.apply(q, k_pre, v_pre, k_diag, v_diag, scale)
    # CUDA flash kernels want densely packed heads
    return _PrefixDiagonalAttention.apply(q.contiguous(), k_pre.contiguous(), v_pre.contiguous(),
                                          k_diag.contiguous(), v_diag.contiguous(), scale)


def query_pieces(query_start: int, query_end: int, doc_starts: list[int]
                 ) -> list[tuple[int, int, int]]:
    """Split global query rows ``[query_start, query_end)`` at document starts.

    Returns ``(a, b, s0)``: rows ``[a, b)`` of the document starting at global position ``s0``.
    ``doc_starts`` is sorted and begins with 0 (one entry for an unpacked sequence).
    """
    pieces = []
    a = query_start
    while a < query_end:
        idx = _last_le(doc_starts, a)
        s0 = doc_starts[idx]
        b = min(query_end, doc_starts[idx + 1]) if idx + 1 < len(doc_starts) else query_end
        pieces.append((a, b, s0))
        a = b
    return pieces


def _last_le(sorted_values: list[int], x: int) -> int:
    import bisect

    return bisect.bisect_right(sorted_values, x) - 1


def document_causal_attention(query: Tensor, key: Tensor, value: Tensor, scale: float,
                              query_chunks: list[tuple[int, int, int]],
                              doc_starts: list[list[int]] | None) -> Tensor:
    """Causal attention restricted to documents, for queries at arbitrary global offsets.

    query: ``[sq, b, np, hn]`` (this rank's rows); key/value: ``[sk, b, ng, hn]`` in global
    order. ``query_chunks``: ``(local_start, local_end, global_start)`` for each contiguous run
    of local rows. ``doc_starts[b]``: sorted global document starts of sample ``b`` (None: one
    document). Returns ``[sq, b, np * hn]``.
    """
    sq, batch, heads, dim = query.shape
    groups = key.shape[2]
    per_group = heads // groups
    outputs = []
    for bi in range(batch):
        starts = doc_starts[bi] if doc_starts is not None else [0]
        heads_out = []
        for g in range(groups):  # GQA: a group's query heads share one (stride-0) KV head
            q = query[:, bi, g * per_group:(g + 1) * per_group].permute(1, 0, 2)[None]
            k = key[:, bi, g:g + 1].permute(1, 0, 2)[None].expand(1, per_group, -1, dim)
            v = value[:, bi, g:g + 1].permute(1, 0, 2)[None].expand(1, per_group, -1, dim)
            pieces = []
            for local_start, local_end, global_start in query_chunks:
                shift = global_start - local_start
                for a, b, s0 in query_pieces(global_start,
                                             global_start + local_end - local_start, starts):
                    pieces.append(prefix_diagonal_attention(
                        q[:, :, a - shift:b - shift], k[:, :, s0:a], v[:, :, s0:a],
                        k[:, :, a:b], v[:, :, a:b], scale))
            heads_out.append(torch.cat(pieces, dim=2)[0])  # [per_group, sq, hn]
        outputs.append(torch.cat(heads_out, dim=0))  # [np, sq, hn]
    out = torch.stack(outputs, dim=0)  # [b, np, sq, hn]
    return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * dim)
