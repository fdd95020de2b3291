"""Exact causal attention for queries that see a key *prefix* plus a causal *diagonal* block.

Long-context attention needs three patterns that plain ``is_causal`` SDPA cannot express:
packed documents (a query sees only its own document), and context parallelism (a rank's query
chunk sits at a global offset and sees all earlier keys), and both together. Each reduces to
query rows ``[a, b)`` of a document starting at ``s0``: keys ``[s0, a)`` are fully visible
(the prefix), keys ``[a, b)`` causally (the diagonal). We cut rows and keys into blocks, run
flash attention per block and merge the blocks with their
log-sum-exps (the ring/flash-attention recurrence); backward calls flash backward per block
with the merged output and log-sum-exp, which makes every block's gradient exact.

Memory: no ``s x s`` mask or score matrix is ever built. Queries, keys and values are read as
strided views (K/V per KV group: the kernels' GQA support, no per-head copies), the output,
its log-sum-exp and the input gradients are preallocated and written block by block in place,
so besides them only one block's temporaries live at a time (see
``benchmarks/results/attention_memory.md``). bf16/fp16 merges and dK/dV sums run in fp32.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import Tensor

_aten = torch.ops.aten

# Query rows per flash call: the temporaries of a call (its output, dq, the fp32 merge
# buffer) scale with them; 1024 rows at 32 heads x 128 are 16 MiB in fp32. Key blocks are 4x
# longer: their temporaries (dk, dv) are per KV group, and every extra key block costs one
# merge pass over the rows' output (memory traffic that matters on GPUs, hence larger blocks
# there). Measured in benchmarks/attention_memory.py.
CPU_BLOCK_SIZE, CUDA_BLOCK_SIZE, KEY_BLOCK_FACTOR = 1024, 4096, 4


@dataclass(frozen=True)
class Block:
    """Local query rows ``[row_start, row_end)`` against keys ``[key_start, key_end)``
    (global positions), causal when the keys are the rows' own positions (the diagonal)."""

    row_start: int
    row_end: int
    key_start: int
    key_end: int
    causal: bool


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
                   ) -> tuple[Tensor, Tensor, tuple]:
    """q ``[1, np, L, d]``, k/v ``[1, ng, S, d]`` (GQA: ``np % ng == 0``, strided views) ->
    (out ``[1, np, L, d]``, lse ``[1, np, L]`` fp32, state for backward)."""
    if q.is_cuda:
        # the CUDA flash kernel reads any strides but the last (head dim) one
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse, cq, ck, mq, mk, seed, offset, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cq, ck, mq, mk, seed, offset)
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                 scale=scale)
    return out, lse, ()


def _flash_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    causal: bool, scale: float, state: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq [1, np, L, d], dk [1, ng, S, d], dv)`` of one block, given the merged
    output and log-sum-exp of its rows (exact for any split of the keys)."""
    if q.is_cuda:
        grad, q, k, v, out = (t if t.stride(-1) == 1 else t.contiguous()
                              for t in (grad, q, k, v, out))
        cq, ck, mq, mk, seed, offset = state
        return _aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, causal, scale=scale)


def _heads(t: Tensor, start: int, end: int, sample: int, heads: slice = slice(None)
           ) -> Tensor:
    """``t [s, b, h, d]`` rows ``[start, end)`` of one sample (and a range of its heads) as a
    ``[1, h, L, d]`` view."""
    return t[start:end, sample, heads].permute(1, 0, 2)[None]


def _group_passes(query: Tensor, key: Tensor, acc: torch.dtype) -> list[tuple[int, int]]:
    """KV-group ranges the backward pass handles one after the other. bf16/fp16 dK/dV are
    summed in fp32; on the CPU the groups are taken a few at a time so that those fp32 sums stay
    within a quarter of the query tensor (on GPUs, one pass: the kernels want many heads)."""
    groups = key.shape[2]
    if acc == key.dtype or query.is_cuda:
        return [(0, groups)]
    per_group = 2 * key[:, :, 0].numel() * torch.finfo(acc).bits // 8  # dK + dV of a group
    step = max(1, query.numel() * query.element_size() // 4 // per_group)
    return [(g, min(groups, g + step)) for g in range(0, groups, step)]


class _DocumentCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, scale: float,
                blocks: list[list[Block]]) -> Tensor:
        sq, batch, heads, _ = query.shape
        out = torch.empty_like(query, memory_format=torch.contiguous_format)  # [sq, b, np, hn]
        stats = torch.promote_types(query.dtype, torch.float32)  # the kernels' lse dtype
        lse = query.new_empty((batch, heads, sq), dtype=stats)  # [b, np, sq]
        states = []
        for bi, sample_blocks in enumerate(blocks):
            sample_states = []
            acc = acc_lse = None  # running output (fp32) and log-sum-exp of the current rows
            for i, blk in enumerate(sample_blocks):
                q = _heads(query, blk.row_start, blk.row_end, bi)
                k = _heads(key, blk.key_start, blk.key_end, bi)
                v = _heads(value, blk.key_start, blk.key_end, bi)
                o, lse_block, state = _flash_forward(q, k, v, blk.causal, scale)
                sample_states.append(state)
                if acc is None:
                    acc, acc_lse = o.to(stats), lse_block
                else:  # merge with the earlier key blocks of these rows
                    merged = torch.logaddexp(acc_lse, lse_block)  # [1, np, L]
                    acc.mul_(torch.exp(acc_lse - merged)[..., None])
                    acc.addcmul_(o, torch.exp(lse_block - merged)[..., None])  # no temporary
                    acc_lse = merged
                del o
                last = i + 1 == len(sample_blocks) or \
                    sample_blocks[i + 1].row_start != blk.row_start
                if last:  # every key block of these rows is in: write them in place
                    _heads(out, blk.row_start, blk.row_end, bi).copy_(acc)
                    lse[bi, :, blk.row_start:blk.row_end] = acc_lse[0]
                    acc = acc_lse = None
            states.append(sample_states)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale, ctx.blocks, ctx.states = scale, blocks, states
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        query, key, value, out, lse = ctx.saved_tensors
        want_q, want_k, want_v = ctx.needs_input_grad[:3]
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()  # [sq, b, np, hn]
        per_group = query.shape[2] // key.shape[2]
        acc = torch.promote_types(key.dtype, torch.float32)
        exact = acc == key.dtype  # fp32/fp64: sum dq, dK and dV in place
        # every local row belongs to exactly one row range: dq is written once per range
        dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # [sq, b, np, hn]
        # dK/dV sum over all row blocks: straight into them, or (bf16/fp16) in fp32 per pass
        make = torch.zeros if exact else torch.empty
        dk = make(key.shape, dtype=key.dtype, device=key.device)  # [sk, b, ng, hn]
        dv = make(value.shape, dtype=value.dtype, device=value.device)
        for g0, g1 in _group_passes(query, key, acc):
            groups, heads = slice(g0, g1), slice(g0 * per_group, g1 * per_group)
            if exact:
                dk_sum, dv_sum = dk[:, :, groups], dv[:, :, groups]
            else:
                dk_sum = torch.zeros(dk[:, :, groups].shape, dtype=acc, device=dk.device)
                dv_sum = torch.zeros_like(dk_sum)
            for bi, sample_blocks in enumerate(ctx.blocks):
                dq_rows = None  # bf16/fp16: fp32 sum of the current row range
                for i, blk in enumerate(sample_blocks):
                    rows = (blk.row_start, blk.row_end, bi)
                    keys = (blk.key_start, blk.key_end, bi)
                    lse_rows = lse[bi:bi + 1, heads, blk.row_start:blk.row_end].contiguous()
                    dq_b, dk_b, dv_b = _flash_backward(
                        _heads(grad, *rows, heads), _heads(query, *rows, heads),
                        _heads(key, *keys, groups), _heads(value, *keys, groups),
                        _heads(out, *rows, heads), lse_rows, blk.causal, ctx.scale,
                        ctx.states[bi][i])
                    _heads(dk_sum, *keys).add_(dk_b)
                    _heads(dv_sum, *keys).add_(dv_b)
                    del dk_b, dv_b
                    first = i == 0 or sample_blocks[i - 1].row_start != blk.row_start
                    last = i + 1 == len(sample_blocks) or \
                        sample_blocks[i + 1].row_start != blk.row_start
                    if exact and first:
                        _heads(dq, *rows, heads).copy_(dq_b)
                    elif exact:
                        _heads(dq, *rows, heads).add_(dq_b)
                    else:
                        dq_rows = dq_b.to(acc) if first else dq_rows.add_(dq_b)
                        if last:
                            _heads(dq, *rows, heads).copy_(dq_rows)
                    del dq_b
            if not exact:
                dk[:, :, groups] = dk_sum
                dv[:, :, groups] = dv_sum
                del dk_sum, dv_sum
        return (dq if want_q else None, dk if want_k else None, dv if want_v else None,
                None, None)


def query_pieces(query_start: int, query_end: int, doc_starts: list[int]
                 ) -> list[tuple[int, int, int]]:
    """Split global query rows ``[query_start, query_end)`` at document starts.

    Returns ``(a, b, s0)``: rows ``[a, b)`` of the document starting at global position ``s0``.
    ``doc_starts`` is sorted and begins with 0 (one entry for an unpacked sequence).
    """
    pieces = []
    a = query_start
    while a < query_end:
        idx = bisect.bisect_right(doc_starts, a) - 1
        s0 = doc_starts[idx]
        b = min(query_end, doc_starts[idx + 1]) if idx + 1 < len(doc_starts) else query_end
        pieces.append((a, b, s0))
        a = b
    return pieces


def attention_blocks(query_chunks: list[tuple[int, int, int]], doc_starts: list[int],
                     block_size: int, key_block_size: int | None = None) -> list[Block]:
    """The flash calls for one sample: each run of local rows cut at document starts and then
    into ``block_size`` rows; each row range sees its document's earlier keys in non-causal
    blocks of at most ``key_block_size`` keys (default ``block_size``), then itself causally
    (the last block of the range). Blocks of one row range are consecutive."""
    key_block_size = key_block_size or block_size
    if block_size < 1 or key_block_size < 1:
        raise ValueError(f"block sizes must be positive, got {block_size}, {key_block_size}")
    blocks = []
    for local_start, local_end, global_start in query_chunks:
        shift = global_start - local_start  # global = local + shift
        for a, b, s0 in query_pieces(global_start, global_start + local_end - local_start,
                                     doc_starts):
            for r in range(a, b, block_size):
                r_end = min(b, r + block_size)
                for k in range(s0, r, key_block_size):
                    blocks.append(Block(r - shift, r_end - shift, k, min(r, k + key_block_size),
                                        False))
                blocks.append(Block(r - shift, r_end - shift, r, r_end, True))
    return blocks


def document_causal_attention(query: Tensor, key: Tensor, value: Tensor, scale: float,
                              query_chunks: list[tuple[int, int, int]],
                              doc_starts: list[list[int]] | None,
                              block_size: int | None = None) -> Tensor:
    """Causal attention restricted to documents, for queries at arbitrary global offsets.

    query: ``[sq, b, np, hn]`` (this rank's rows); key/value: ``[sk, b, ng, hn]`` in global
    order. ``query_chunks``: ``(local_start, local_end, global_start)`` for each contiguous run
    of local rows (together they cover all ``sq`` rows). ``doc_starts[b]``: sorted global
    document starts of sample ``b`` (None: one document). ``block_size``: query rows per flash
    call (default 1024 on CPU, 4096 on CUDA), keys per call 4x that. Returns
    ``[sq, b, np * hn]``.
    """
    sq, batch, heads, dim = query.shape
    if heads % key.shape[2]:
        raise ValueError(f"{heads} query heads do not split into {key.shape[2]} KV groups")
    edge = 0  # the backward pass writes each row's gradient once: rows must tile [0, sq)
    for start, end, _ in sorted(query_chunks):
        if start != edge or end <= start:
            raise ValueError(f"query_chunks {query_chunks} must cover rows [0, {sq}) once")
        edge = end
    if edge != sq:
        raise ValueError(f"query_chunks {query_chunks} must cover rows [0, {sq}) once")
    block_size = block_size or (CUDA_BLOCK_SIZE if query.is_cuda else CPU_BLOCK_SIZE)
    key_block_size = KEY_BLOCK_FACTOR * block_size
    blocks = [attention_blocks(query_chunks, doc_starts[bi] if doc_starts is not None else [0],
                               block_size, key_block_size) for bi in range(batch)]
    out = _DocumentCausalAttention.apply(query, key, value, scale, blocks)  # [sq, b, np, hn]
    return out.view(sq, batch, heads * dim)
