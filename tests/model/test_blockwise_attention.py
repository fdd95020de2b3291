"""Document-causal and offset (context-parallel) attention against dense float64 references."""

import pytest
import torch

from megatron_longctx.model.blockwise_attention import document_causal_attention, query_pieces
from megatron_longctx.model.context_parallel import local_query_chunks, slice_for_cp_rank


def dense_reference(q, k, v, scale, doc_starts):
    """float64 softmax attention with an explicit [s, s] document-causal mask."""
    s, b, h, d = q.shape
    g = k.shape[2]
    out = []
    for bi in range(b):
        doc = torch.zeros(s, dtype=torch.long)
        for start in doc_starts[bi][1:]:
            doc[start:] += 1
        mask = torch.ones(s, s, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])
        qb = q[:, bi].double().transpose(0, 1)
        kb = k[:, bi].double().transpose(0, 1).repeat_interleave(h // g, 0)
        vb = v[:, bi].double().transpose(0, 1).repeat_interleave(h // g, 0)
        att = (qb @ kb.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        out.append((att @ vb).transpose(0, 1).reshape(s, h * d))
    return torch.stack(out, dim=1)


def test_query_pieces():
    assert query_pieces(0, 10, [0]) == [(0, 10, 0)]
    assert query_pieces(4, 12, [0, 3, 7, 20]) == [(4, 7, 3), (7, 12, 7)]


@pytest.mark.parametrize("doc_starts", [[[0], [0]], [[0, 5, 6, 30], [0, 17]]])
def test_document_causal_matches_dense_mask_with_grads(doc_starts):
    torch.manual_seed(0)
    s, b, h, g, d = 40, 2, 4, 2, 8
    q, k, v = (torch.randn(s, b, n, d, dtype=torch.float64, requires_grad=True)
               for n in (h, g, g))
    out = document_causal_attention(q, k, v, d ** -0.5, [(0, s, 0)], doc_starts)
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


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("docs", [None, [[0, 13, 14, 50]]])
def test_cp_rank_chunks_equal_full_attention_rows(cp, docs):
    """Each CP rank's two chunks, against all keys, give the rows of full attention."""
    torch.manual_seed(2)
    s, h, d = 64, 2, 8
    q, k, v = (torch.randn(s, 1, h, d, dtype=torch.float64) for _ in range(3))
    full = dense_reference(q, k, v, 0.3, docs or [[0]])
    for rank in range(cp):
        local_q = slice_for_cp_rank(q, rank, cp, dim=0)
        out = document_causal_attention(local_q, k, v, 0.3,
                                        local_query_chunks(rank, cp, local_q.shape[0]), docs)
        torch.testing.assert_close(out, slice_for_cp_rank(full, rank, cp, dim=0),
                                   rtol=1e-10, atol=1e-10)


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
