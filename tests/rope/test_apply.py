"""Applying rotary tables: relative-position property for every type, partial/interleaved
rotation, n-hat start tokens, TP head slicing."""

import pytest
import torch

from megatron_longctx.rope import RotaryEmbedding, apply_rotary

HEAD_DIM, HEADS, GROUPS = 32, 8, 2
D2 = HEAD_DIM // 2
TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "ntk": {"rope_type": "ntk", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                 "short_factor": [1.0 + 0.05 * j for j in range(D2)],
                 "long_factor": [1.0 + 0.2 * j for j in range(D2)],
                 "original_max_position_embeddings": 64},
    "harpe": {"rope_type": "harpe", "harpe_bases": [1e4, 5e5]},
    "harpe_peak_valley": {"rope_type": "harpe", "harpe_scheme": "peak_valley",
                          "harpe_base_min": 1e4, "harpe_base_max": 5e5, "harpe_stride": 1e4},
}


def rotary(params, **kw):
    kw = {"max_position_embeddings": 256, **kw}
    return RotaryEmbedding(params, HEAD_DIM, HEADS, GROUPS, **kw)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_relative_position(name, interleaved):
    """q_m . k_n after rotation is a function of m - n, for every query head against its
    KV group's key (GQA), also past the original length."""
    torch.manual_seed(0)
    rope = rotary(TYPES[name])
    positions = torch.arange(200)[None]  # [1, s], s > original length 64
    tables = rope(positions, seq_len=200)
    q = torch.randn(1, 1, HEADS, HEAD_DIM).expand(200, 1, HEADS, HEAD_DIM)  # same q everywhere
    k = torch.randn(1, 1, GROUPS, HEAD_DIM).expand(200, 1, GROUPS, HEAD_DIM)
    q_rot = apply_rotary(q, tables.cos_q, tables.sin_q, interleaved)  # [s, 1, h, d]
    k_rot = apply_rotary(k, tables.cos_k, tables.sin_k, interleaved)
    k_for_q = k_rot.repeat_interleave(HEADS // GROUPS, dim=2)
    scores = torch.einsum("mhd,nhd->hmn", q_rot[:, 0].double(), k_for_q[:, 0].double())
    for delta in (0, 1, 7, 63, 150):
        diag = torch.diagonal(scores, offset=-delta, dim1=1, dim2=2)  # (m, n) with m - n = delta
        spread = (diag - diag[:, :1]).abs().max()
        assert spread <= 1e-5 * scores.abs().max(), (name, delta, spread)


def test_relative_property_breaks_when_bases_not_shared_within_group():
    """Control: keys rotated with another head's base lose the property (the test can fail)."""
    rope = rotary(TYPES["harpe"])
    positions = torch.arange(100)[None]
    t = rope(positions)
    q = torch.randn(1, 1, HEADS, HEAD_DIM).expand(100, 1, HEADS, HEAD_DIM)
    k = torch.randn(1, 1, GROUPS, HEAD_DIM).expand(100, 1, GROUPS, HEAD_DIM)
    q_rot = apply_rotary(q, t.cos_q, t.sin_q)
    k_wrong = apply_rotary(k, t.cos_k.flip(2), t.sin_k.flip(2)).repeat_interleave(4, dim=2)
    scores = torch.einsum("mhd,nhd->hmn", q_rot[:, 0], k_wrong[:, 0])
    diag = torch.diagonal(scores, offset=-5, dim1=1, dim2=2)
    assert (diag - diag[:, :1]).abs().max() > 1e-2


def test_rotation_is_a_rotation_and_partial_rotary_passes_the_rest():
    rope = rotary(TYPES["yarn"], rotary_percent=0.5)
    positions = torch.tensor([[0, 5, 900, 3]])  # arbitrary, non-monotone
    t = rope(positions)
    assert t.cos_q.shape == (4, 1, 1, HEAD_DIM // 4)
    x = torch.randn(4, 1, HEADS, HEAD_DIM)
    y = apply_rotary(x, t.cos_q, t.sin_q)
    assert torch.equal(y[..., HEAD_DIM // 2:], x[..., HEAD_DIM // 2:])
    m = rope.attention_factor
    assert m > 1.0
    torch.testing.assert_close(y[..., :HEAD_DIM // 2].norm(dim=-1),
                               m * x[..., :HEAD_DIM // 2].norm(dim=-1))
    # position 0 has angle 0: only the attention factor applies
    torch.testing.assert_close(y[0, ..., :HEAD_DIM // 2], m * x[0, ..., :HEAD_DIM // 2])


def test_longrope_start_tokens_keep_original_angles_and_no_factor():
    params = {**TYPES["longrope"], "longrope_start_tokens": 4}
    rope = rotary(params)
    plain = rotary(TYPES["default"])
    positions = torch.arange(100)[None]  # 100 > 64: long factors
    t, ref = rope(positions), plain(positions)
    torch.testing.assert_close(t.cos_q[:4], ref.cos_q[:4], rtol=0, atol=1e-7)
    torch.testing.assert_close(t.sin_q[:4], ref.sin_q[:4], rtol=0, atol=1e-7)
    m = rope.attention_factor
    assert m > 1.0
    norm = (t.cos_q[4:] ** 2 + t.sin_q[4:] ** 2).sqrt()
    torch.testing.assert_close(norm, torch.full_like(norm, m))
    assert not torch.allclose(t.cos_q[4:], ref.cos_q[4:])


def test_longrope_switches_factor_sets_on_length():
    rope = rotary(TYPES["longrope"])
    short_q, _, _ = rope.frequencies(64)
    long_q, _, _ = rope.frequencies(65)
    ratio = short_q / long_q
    expected = torch.tensor(TYPES["longrope"]["long_factor"]) / torch.tensor(
        TYPES["longrope"]["short_factor"])
    torch.testing.assert_close(ratio[0], expected)


def test_tp_ranks_take_their_slice_of_harpe_heads():
    full = rotary(TYPES["harpe"])
    ranks = [rotary(TYPES["harpe"], tp_rank=r, tp_size=2) for r in range(2)]
    torch.testing.assert_close(torch.cat([r.inv_freq_q for r in ranks]), full.inv_freq_q)
    torch.testing.assert_close(torch.cat([r.inv_freq_k for r in ranks]), full.inv_freq_k)
    assert ranks[0].inv_freq_k.shape == (1, D2) and ranks[0].inv_freq_q.shape == (4, D2)
    assert not torch.equal(ranks[0].inv_freq_k, ranks[1].inv_freq_k)


def test_shared_bases_broadcast_one_row():
    rope = rotary(TYPES["llama3"])
    t = rope(torch.arange(10)[None])
    assert t.cos_q.shape == (10, 1, 1, HEAD_DIM // 2) and t.cos_k is t.cos_q


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_hand_written_backward_matches_autograd(interleaved, percent):
    rope = rotary(TYPES["harpe"], rotary_percent=percent)
    t = rope(torch.tensor([[3, 17, 250, 4, 99]]), dtype=torch.float64)
    x = torch.randn(5, 1, HEADS, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: apply_rotary(v, t.cos_q, t.sin_q, interleaved), x)
    # and equals the textbook formula: x * cos + rotate_half(x) * sin
    half = t.cos_q.shape[-1]
    if interleaved:
        cos = t.cos_q.repeat_interleave(2, -1)
        sin = t.sin_q.repeat_interleave(2, -1)
        x_rot = x[..., :2 * half]
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), -1).flatten(-2)
    else:
        cos, sin = torch.cat([t.cos_q] * 2, -1), torch.cat([t.sin_q] * 2, -1)
        x_rot = x[..., :2 * half]
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), -1)
    expected = torch.cat([x_rot * cos + rotated * sin, x[..., 2 * half:]], -1)
    torch.testing.assert_close(apply_rotary(x, t.cos_q, t.sin_q, interleaved), expected)
