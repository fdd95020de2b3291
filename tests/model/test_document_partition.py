"""Per-document CP layout (TE's THD partition): slots against an independent transcription of
TE's ``thd_get_partitioned_indices`` kernel, token bookkeeping, the gather order, and
attention on the layout against the float64 reference on the original sample."""

import pytest
import torch
from fake_transformer_engine import te_partitioned_indices
from test_blockwise_attention import dense_reference

from megatron_longctx.model.blockwise_attention import document_causal_attention
from megatron_longctx.model.document_partition import (
    gathered_to_global,
    global_to_local,
    lay_out,
    partition_documents,
    rank_sources,
    thd_cu_seqlens,
)
from megatron_longctx.model.flex_attention import flex_document_attention
from megatron_longctx.model.unfused_attention import unfused_attention

CASES = [  # (doc_starts, seq_length, cp)
    ([0], 64, 2),
    ([0, 5, 6, 17, 40], 64, 2),
    ([0, 3, 30, 33, 61], 64, 4),
    ([0, 9, 18, 27, 36, 45, 54], 64, 4),  # padding pushes the last documents out
    ([0, 16, 32], 64, 2),  # nothing to pad
]


@pytest.mark.parametrize("starts,s,cp", CASES)
def test_rank_slots_are_te_partitioned_indices(starts, s, cp):
    layout = partition_documents(starts, s, cp)
    _, padded = thd_cu_seqlens([layout])
    assert all(p % (2 * cp) == 0 for p in padded) and padded[-1] == s
    owners = torch.zeros(s, dtype=torch.long)
    for rank in range(cp):
        slots = layout.rank_slots(rank)
        assert slots.tolist() == te_partitioned_indices(padded, s, cp, rank)
        owners[slots] += 1
    assert (owners == 1).all()  # the ranks' slots tile the sample


@pytest.mark.parametrize("starts,s,cp", CASES)
def test_tokens_keep_their_order_and_only_the_tail_is_dropped(starts, s, cp):
    layout = partition_documents(starts, s, cp)
    source = layout.source_index()
    kept = source[source >= 0]
    # every kept token in order, and they are the sample's first tokens
    assert kept.tolist() == list(range(len(kept))) == list(range(layout.kept_tokens))
    # independent count: each document padded to a multiple of 2 cp until s slots are used
    slot, expected = 0, 0
    for a, b in zip(starts, [*starts[1:], s]):
        if slot >= s:
            break
        expected += min(b - a, s - slot)
        slot += -(-min(b - a, s - slot) // (2 * cp)) * 2 * cp
    assert layout.kept_tokens == expected
    for start, length, src in zip(layout.starts, layout.lengths, layout.sources):
        assert start % (2 * cp) == 0 and src in starts
        assert source[start:start + length].tolist() == list(range(src, src + length))
    if starts == [0, 16, 32]:
        assert layout.kept_tokens == s  # documents already fit: nothing padded or dropped


def test_one_rank_keeps_the_sample_as_it_is():
    layout = partition_documents([0, 5, 6, 17], 24, 1)
    assert layout.source_index().tolist() == list(range(24))
    assert layout.mask_starts() == [0, 5, 6, 17]
    assert thd_cu_seqlens([layout, layout]) == ([0, 5, 6, 17, 24, 29, 30, 41, 48],) * 2


def test_cu_seqlens_of_a_micro_batch():
    a = partition_documents([0, 5, 6, 17], 24, 2)  # lengths 5, 1, 11, 7 -> padded 8, 4, 12
    b = partition_documents([0], 24, 2)
    assert (a.starts, a.lengths) == ((0, 8, 12), (5, 1, 11))  # the last document: no room
    assert a.mask_starts() == [0, 5, 8, 9, 12, 23]
    assert thd_cu_seqlens([a, b]) == ([0, 5, 6, 17, 41], [0, 8, 12, 24, 48])


@pytest.mark.parametrize("bad,message", [(([0, 5], 30, 2), "multiple of 2 \\* CP"),
                                         (([1, 5], 32, 2), "increase from 0"),
                                         (([0, 5, 5], 32, 2), "increase from 0"),
                                         (([0, 40], 32, 2), "below 32")])
def test_bad_layouts_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        partition_documents(*bad)


def test_gather_order_rebuilds_the_slots_and_back():
    s, cp = 32, 2
    layouts = [partition_documents([0, 5, 6, 17], s, cp), partition_documents([0, 9], s, cp)]
    values = torch.arange(2 * s).view(2, s) * 10  # [b, s] distinct values
    parts = [lay_out(values, rank_sources(layouts, r), fill=-1).t()
             for r in range(cp)]  # [s/cp, b] each
    gathered = torch.cat(parts).reshape(-1)  # rank-major, flattened over (row, sample)
    full = gathered[gathered_to_global(layouts, "cpu")].view(s, 2)  # [s, b] in slot order
    for j, layout in enumerate(layouts):
        source = layout.source_index()
        expected = torch.where(source >= 0, values[j][source.clamp(min=0)], -1)
        assert full[:, j].tolist() == expected.tolist()
    for rank in range(cp):
        local = full.reshape(-1)[global_to_local(layouts, rank, "cpu")].view(s // cp, 2)
        assert torch.equal(local, parts[rank])


def _attend_blockwise(q, k, v, scale, chunks, starts):
    return document_causal_attention(q, k, v, scale, chunks, starts, block_size=4)


@pytest.mark.parametrize("attend", [_attend_blockwise, unfused_attention,
                                    flex_document_attention],
                         ids=["blockwise", "unfused", "flex"])
@pytest.mark.parametrize("starts,s,cp", CASES[1:4])
def test_attention_on_the_layout_equals_the_original_sample(attend, starts, s, cp):
    """Each rank attends with its slots' queries against all slots' keys; every kept token's
    output equals its output in the original sample (float64 dense reference); fp32 1e-5."""
    torch.manual_seed(0)
    h, g, d = 4, 2, 8
    q, k, v = torch.randn(s, 1, h, d), torch.randn(s, 1, g, d), torch.randn(s, 1, g, d)
    scale = d ** -0.5
    reference = dense_reference(q, k, v, scale, [starts])  # [s, 1, h * d] float64
    layout = partition_documents(starts, s, cp)
    source = layout.source_index()
    noise = torch.randn(s, 1, h + 2 * g, d) * 100  # padding slots: anything, never seen
    q_, k_, v_ = (torch.where((source >= 0)[:, None, None, None], t[source.clamp(min=0)], n)
                  for t, n in zip((q, k, v), noise.split([h, g, g], dim=2)))
    for rank in range(cp):
        slots = layout.rank_slots(rank)
        with torch.no_grad():
            out = attend(q_[slots], k_, v_, scale, layout.rank_chunks(rank),
                         [layout.mask_starts()])  # [s / cp, 1, h * d]
        real = source[slots] >= 0
        torch.testing.assert_close(out[real].double(), reference[source[slots][real]],
                                   rtol=1e-5, atol=1e-5)
