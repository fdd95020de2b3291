"""Frequencies and attention factors of every RoPE type against transformers or float64 math."""

import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_longctx.rope import compute_inv_freq
from megatron_longctx.rope.harpe import harpe_bases
from megatron_longctx.rope.methods import yarn_correction_range

RTOL = 1e-6


def hf(rope_parameters, head_dim, max_position_embeddings, seq_len=None, partial=1.0):
    params = dict(rope_parameters)
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=max_position_embeddings, rope_parameters=params)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)


def ours(rope_parameters, head_dim, seq_len=None, max_pos=None, partial=1.0, heads=4, groups=4):
    return compute_inv_freq(rope_parameters, head_dim, heads, groups, partial, seq_len=seq_len,
                            max_position_embeddings=max_pos)


def assert_matches(ours_result, hf_result):
    (inv, factor), (inv_hf, factor_hf) = ours_result, hf_result
    assert inv.dtype == torch.float32 and inv.shape[1] == inv_hf.shape[0]
    for row in inv:  # shared bases: every head's row equals transformers' vector
        torch.testing.assert_close(row, inv_hf.float(), rtol=RTOL, atol=0)
    assert factor == pytest.approx(float(factor_hf), rel=RTOL)


GRID = [(hd, base, factor, orig) for hd in (64, 128) for base in (1e4, 5e5)
        for factor in (2.0, 8.0, 16.0) for orig in (2048, 4096, 8192)]


@pytest.mark.parametrize("head_dim,base,factor,orig", GRID)
def test_linear_yarn_llama3_match_transformers(head_dim, base, factor, orig):
    target = int(orig * factor)
    linear = {"rope_type": "linear", "rope_theta": base, "factor": factor}
    assert_matches(ours(linear, head_dim), hf(linear, head_dim, target))
    yarn = {"rope_type": "yarn", "rope_theta": base, "factor": factor,
            "original_max_position_embeddings": orig}
    assert_matches(ours(yarn, head_dim, max_pos=target), hf(yarn, head_dim, target))
    llama3 = {"rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": orig}
    assert_matches(ours(llama3, head_dim), hf(llama3, head_dim, target))


@pytest.mark.parametrize("head_dim,base,factor,orig", GRID[::3])
@pytest.mark.parametrize("seq_frac", [0.5, 1.0, 3.7])
def test_dynamic_and_longrope_match_transformers(head_dim, base, factor, orig, seq_frac):
    seq_len = int(orig * seq_frac)
    dynamic = {"rope_type": "dynamic", "rope_theta": base, "factor": factor,
               "original_max_position_embeddings": orig}
    # transformers' dynamic NTK takes L from max_position_embeddings
    assert_matches(ours(dynamic, head_dim, seq_len=seq_len), hf(dynamic, head_dim, orig, seq_len))
    rng = np.random.default_rng(int(base) + head_dim)
    short = np.sort(rng.uniform(1, 2, head_dim // 2)).tolist()
    long = np.sort(rng.uniform(1, factor, head_dim // 2)).tolist()
    longrope = {"rope_type": "longrope", "rope_theta": base, "short_factor": short,
                "long_factor": long, "original_max_position_embeddings": orig}
    target = int(orig * factor)
    assert_matches(ours(longrope, head_dim, seq_len=seq_len, max_pos=target),
                   hf(longrope, head_dim, target, seq_len))


def test_partial_rotary_matches_transformers():
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
            "original_max_position_embeddings": 4096}
    inv, _ = ours(yarn, 128, max_pos=16384, partial=0.5)
    assert inv.shape == (4, 32)
    assert_matches((inv, _), hf(yarn, 128, 16384, partial=0.5))


def test_methods_md_vectors():
    assert yarn_correction_range(32, 1, 128, 1e4, 4096, truncate=False) == pytest.approx(
        (20.944, 45.027), abs=1e-3)
    assert yarn_correction_range(32, 1, 128, 1e4, 4096) == (20, 46)
    inv, _ = ours({"rope_type": "ntk", "rope_theta": 1e4, "factor": 8.0}, 128)
    assert 1.0 / inv[0, 1].item() ** (128 / 2) == pytest.approx(82684.62, rel=1e-5)
    base = 1.0 / (5e5 ** (np.arange(0, 128, 2) / 128))
    inv, _ = ours({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 128)
    ratio = base / inv[0].double().numpy()
    kept, divided = np.isclose(ratio, 1, rtol=1e-5), np.isclose(ratio, 8, rtol=1e-5)
    assert (kept.sum(), (~kept & ~divided).sum(), divided.sum()) == (29, 6, 29)
    phi3 = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 48,
            "long_factor": [1.0] * 48, "original_max_position_embeddings": 4096}
    assert ours(phi3, 96, max_pos=131072)[1] == pytest.approx(1.19024, abs=1e-5)


@pytest.mark.parametrize("head_dim,base,factor", [(64, 1e4, 4.0), (128, 5e5, 8.0), (96, 1e6, 2.5)])
def test_ntk_equals_float64_formula(head_dim, base, factor):
    inv, attention = ours({"rope_type": "ntk", "rope_theta": base, "factor": factor}, head_dim)
    new_base = base * factor ** (head_dim / (head_dim - 2))
    expected = 1.0 / new_base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    np.testing.assert_allclose(inv[0].double().numpy(), expected, rtol=RTOL)
    assert attention == 1.0


def test_harpe_per_group_bases_equal_float64_formula():
    bases = [1e6, 2.5e6, 4e6, 5e6]
    inv, attention = compute_inv_freq({"rope_type": "harpe", "harpe_bases": bases}, 64, 8, 4)
    assert inv.shape == (8, 32) and attention == 1.0
    for head in range(8):
        b = bases[head // 2]  # two query heads per KV group share its base
        expected = 1.0 / b ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
        np.testing.assert_allclose(inv[head].double().numpy(), expected, rtol=RTOL)


def test_harpe_equal_bases_reproduce_default_bit_for_bit():
    default, _ = compute_inv_freq({"rope_type": "default", "rope_theta": 1e6}, 64, 8, 2)
    harpe, _ = compute_inv_freq({"rope_type": "harpe", "harpe_bases": [1e6, 1e6]}, 64, 8, 2)
    assert torch.equal(default, harpe)


def test_harpe_schemes():
    asc = harpe_bases("uniform_ascending", 5, 1e6, 5e6, 3e4, 128)
    assert asc == [1e6, 2e6, 3e6, 4e6, 5e6]
    assert harpe_bases("uniform_descending", 5, 1e6, 5e6, 3e4, 128) == asc[::-1]
    pv = harpe_bases("peak_valley", 8, 1e6, 5e6, 3e4, 128)
    assert len(set(pv)) == 8 and pv[0] == 1e6 and pv == sorted(pv)
    on_grid = [(b - 1e6) / 3e4 for b in pv]
    assert all(abs(g - round(g)) < 1e-9 for g in on_grid) and max(pv) <= 5e6


@pytest.mark.parametrize("params,match", [
    ({"rope_type": "nope"}, "unknown; choose one of"),
    ({"rope_type": "linear", "rope_theta": 1e4}, r"needs rope_parameters \['factor'\]"),
    ({"rope_type": "linear", "rope_theta": -1.0, "factor": 2.0},
     r"'rope_theta'\] must be positive"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fst": 3,
      "original_max_position_embeddings": 4096}, r"\['beta_fst'\] do not apply"),
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 31,
      "long_factor": [1.0] * 32, "original_max_position_embeddings": 4096, "factor": 4.0},
     r"'short_factor'\] has 31 values; rotary dim 64 needs 32"),
    ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}, "low_freq_factor"),
    ({"rope_type": "harpe", "harpe_bases": [1e6, 2e6, 3e6]}, "has 3 bases; give one per KV group"),
    ({"rope_type": "harpe", "harpe_bases": [1e6, -2e6]}, "must all be positive"),
    ({"rope_type": "harpe"}, "exactly one of 'harpe_bases'"),
    ({"rope_type": "harpe", "harpe_scheme": "zigzag"}, "harpe_scheme'\\]='zigzag'"),
    ({"rope_type": "harpe", "harpe_scheme": "peak_valley", "harpe_base_min": 1e6,
      "harpe_base_max": 1.005e6, "harpe_stride": 1e4}, "only 1 candidate bases"),
])
def test_bad_parameters_name_the_key(params, match):
    with pytest.raises(ValueError, match=match):
        compute_inv_freq(params, 64, 4, 2)


def test_non_monotone_longrope_factors_warn():
    params = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [2.0, 1.0] * 16,
              "long_factor": [1.0] * 32, "original_max_position_embeddings": 4096, "factor": 4.0}
    with pytest.warns(UserWarning, match="not monotone"):
        compute_inv_freq(params, 64, 4, 2)
    params["short_factor"] = [1.0] * 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_inv_freq(params, 64, 4, 2)
