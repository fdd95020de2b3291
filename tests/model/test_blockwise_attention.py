"""Document-causal and offset (context-parallel) attention against dense float64 references."""

import pytest
import torch

from megatron_longctx.model.blockwise_attention import (
    attention_blocks,
    document_causal_attention,
    query_pieces,
)
from megatron_longctx.model.context_parallel import local_query_chunks, slice_for_cp_rank


def dense_reference(q, k, v, scale, doc_starts):
    """float64 softmax attention with an explicit [s, s] document-causal mask."""
    s, b, h, d = q.shape
    g = k.shape[2]
    out = []
    for bi in range(b):
        mask = document_causal_mask(s, doc_starts[bi])
        qb = q[:, bi].double().transpose(0, 1)
        kb = k[:, bi].double().transpose(0, 1).repeat_interleave(h // g, 0)
        vb = v[:, bi].double().transpose(0, 1).repeat_interleave(h // g, 0)
        att = (qb @ kb.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        out.append((att @ vb).transpose(0, 1).reshape(s, h * d))
    return torch.stack(out, dim=1)


def test_query_pieces():
    assert query_pieces(0, 10, [0]) == [(0, 10, 0)]
    assert query_pieces(4, 12, [0, 3, 7, 20]) == [(4, 7, 3), (7, 12, 7)]


def document_causal_mask(s, starts):
    doc = torch.zeros(s, dtype=torch.long)
    for start in starts[1:]:
        doc[start:] += 1
    return torch.ones(s, s, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])


@pytest.mark.parametrize("block_size,key_block_size", [(1, 1), (3, 3), (2, 8), (8, 8),
                                                       (4096, 4096)])
@pytest.mark.parametrize("cp", [1, 2])
def test_blocks_tile_the_document_causal_mask_once(block_size, key_block_size, cp):
    """Every visible (query, key) pair is computed exactly once, nothing else, and the causal
    blocks are exactly the diagonal ones."""
    from megatron_longctx.model.context_parallel import local_query_chunks

    s, starts = 24, [0, 5, 6, 17]
    mask = document_causal_mask(s, starts)
    for rank in range(cp):
        chunks = [(0, s, 0)] if cp == 1 else local_query_chunks(rank, cp, s // cp)
        count = torch.zeros(s, s, dtype=torch.long)
        for blk in attention_blocks(chunks, starts, block_size, key_block_size):
            assert blk.row_end - blk.row_start <= block_size
            assert blk.key_end - blk.key_start <= key_block_size
            shift = next(g - a for a, e, g in chunks if a <= blk.row_start < e)
            rows = slice(blk.row_start + shift, blk.row_end + shift)
            assert blk.causal == (rows.start == blk.key_start and rows.stop == blk.key_end)
            part = torch.ones(rows.stop - rows.start, blk.key_end - blk.key_start,
                              dtype=torch.long)
            count[rows, blk.key_start:blk.key_end] += part.tril() if blk.causal else part
        global_rows = torch.cat([torch.arange(g, g + e - a) for a, e, g in chunks])
        assert torch.equal(count[global_rows], mask[global_rows].long())


@pytest.mark.parametrize("block_size", [4096, 7])
@pytest.mark.parametrize("doc_starts", [[[0], [0]], [[0, 5, 6, 30], [0, 17]]])
def test_document_causal_matches_dense_mask_with_grads(doc_starts, block_size):
    torch.manual_seed(0)
    s, b, h, g, d = 40, 2, 4, 2, 8
    q, k, v = (torch.randn(s, b, n, d, dtype=torch.float64, requires_grad=True)
               for n in (h, g, g))
    out = document_causal_attention(q, k, v, d ** -0.5, [(0, s, 0)], doc_starts,
                                    block_size=block_size)
    ref = dense_reference(q, k, v, d ** -0.5, doc_starts)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_packed_documents_equal_separate_runs():
    torch.manual_seed(1)
    bounds = [0, 9, 10, 33, 48]
    q, k, v = (torch.randn(48, 1, 2, 16) for _ in range(3))
    packed = document_causal_attention(q, k, v, 0.25, [(0, 48, 0)], [bounds[:-1]])
    for a, e in zip(bounds, bounds[1:]):
        alone = document_causal_attention(q[a:e], k[a:e], v[a:e], 0.25, [(0, e - a, 0)], None)
        torch.testing.assert_close(packed[a:e], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cp,block_size", [(2, 4096), (4, 4096), (2, 5)])
@pytest.mark.parametrize("docs", [None, [[0, 13, 14, 50]]])
def test_cp_rank_chunks_equal_full_attention_rows(cp, docs, block_size):
    """Each CP rank's two chunks, against all keys, give the rows of full attention."""
    torch.manual_seed(2)
    s, h, d = 64, 2, 8
    q, k, v = (torch.randn(s, 1, h, d, dtype=torch.float64) for _ in range(3))
    full = dense_reference(q, k, v, 0.3, docs or [[0]])
    for rank in range(cp):
        local_q = slice_for_cp_rank(q, rank, cp, dim=0)
        out = document_causal_attention(local_q, k, v, 0.3,
                                        local_query_chunks(rank, cp, local_q.shape[0]), docs,
                                        block_size=block_size)
        torch.testing.assert_close(out, slice_for_cp_rank(full, rank, cp, dim=0),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_size,g", [(3, 1), (8, 1), (8, 2)])
def test_bf16_blocks_match_float64_reference(block_size, g):
    """bf16 with many blocks (fp32 merges and dK/dV sums, two KV groups: one backward pass
    each) stays within bf16 rounding: max error <= 1% of the largest reference value (one
    block, no merging, measures 0.2-0.6%)."""
    from megatron_longctx.model.blockwise_attention import _group_passes

    torch.manual_seed(3)
    s, h, d = 96, 4, 16
    # float64 copies of bf16 values: the reference sees exactly the inputs bf16 does
    q, k, v = (torch.randn(s, 1, n, d).bfloat16().double() for n in (h, g, g))
    ref = dense_reference(*(t.requires_grad_() for t in (q, k, v)), 0.25, [[0, 40]])
    grad = torch.randn_like(ref).bfloat16().double()
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    assert len(_group_passes(low[0], low[1], torch.float32)) == g
    out = document_causal_attention(*low, 0.25, [(0, s, 0)], [[0, 40]], block_size=block_size)
    got = torch.autograd.grad(out, low, grad.bfloat16())
    for a, e in zip((out, *got), (ref, *expected)):
        assert a.dtype == torch.bfloat16
        assert (a.double() - e).abs().max() <= 1e-2 * e.abs().max()


def test_query_chunks_must_tile_the_rows():
    q = torch.zeros(8, 1, 2, 4)
    with pytest.raises(ValueError, match="cover rows"):
        document_causal_attention(q, q, q, 1.0, [(0, 4, 0)], None)


def test_no_dense_mask_memory_at_long_length():
    """32k tokens in 3 documents: peak extra memory stays far below an s x s score matrix."""

    import psutil

    s, h, d = 32768, 1, 16
    q, k, v = (torch.randn(s, 1, h, d) for _ in range(3))
    proc = psutil.Process()
    before = proc.memory_info().rss
    out = document_causal_attention(q, k, v, 0.25, [(0, s, 0)], [[0, 1000, 20000]])
    grown = proc.memory_info().rss - before
    assert out.shape == (s, 1, h * d)
    assert grown < s * s * 4 / 16, grown  # a dense fp32 score matrix would be 4 GiB
