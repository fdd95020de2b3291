"""FLOPs per iteration: against torch's FLOP counter on our model, against hand arithmetic for a
Llama-2-7B shape, and the document-masked attention figure."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_longctx.config import ModelConfig, ParallelConfig
from megatron_longctx.data.samples.long_context_dataset import SampleOptions, build_sample
from megatron_longctx.model import build_model
from megatron_longctx.training.flops import (
    document_lengths,
    effective_attention_flops,
    known_peak_tflops,
    measure_matmul_peak_tflops,
    num_floating_point_operations,
    peak_tflops,
)

LLAMA2_7B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                        num_attention_heads=32, vocab_size=32000)


def counted_flops(model, tokens, positions, backend=None) -> int:
    with FlopCounterMode(display=False) as counter:
        if backend is None:
            model(tokens, positions, None, labels=tokens).sum().backward()
        else:
            with sdpa_kernel(backend):
                model(tokens, positions, None, labels=tokens).sum().backward()
    return counter.get_total_flops()


def test_formula_matches_flop_counter(model_parallel):
    """torch's counter sees every GEMM of forward + backward: the fused QKV, the attention
    output, the SwiGLU fc1/fc2 and the logits (embedding lookup and its gradient are no GEMMs,
    in both counts). GQA and a head dim other than hidden/heads are exercised."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                      num_query_groups=2, kv_channels=24, vocab_size=260)
    cfg.validate()
    model = build_model(cfg, ParallelConfig())
    b, s = 2, 48
    tokens = torch.randint(0, cfg.vocab_size, (b, s))
    positions = torch.arange(s).expand(b, -1)
    total = num_floating_point_operations(cfg, s, b)
    attention = effective_attention_flops(cfg, [[s]] * b)
    assert 0 < attention < total

    # Attention runs in CPU flash kernels (aten._scaled_dot_product_flash_attention_for_cpu),
    # which the counter does not know: it sees exactly the formula's other terms.
    linear = counted_flops(model, tokens, positions)
    assert linear == pytest.approx(total - attention, rel=1e-12)

    # With SDPA's math backend the score GEMMs become bmm's the counter sees. It counts the
    # whole s x s score matrix (2 GEMMs forward, 4 backward); Megatron-LM's causal convention
    # counts half of it, so the counter's attention is exactly twice the formula's.
    with_math = counted_flops(model, tokens, positions, SDPBackend.MATH)
    assert with_math - linear == pytest.approx(2 * attention, rel=1e-12)


def test_llama2_7b_by_hand():
    """Llama-2-7B (MHA, SwiGLU f=11008, V=32000 already a multiple of 128) at s=4096, b=1, in
    the published form: 6 N per token for the N weights of the GEMMs, plus causal attention
    6 L s h per token (12 L s h over the full score matrix, halved for the causal mask)."""
    L, h, f, V, s = 32, 4096, 11008, 32000, 4096
    n_layer = 4 * h * h + 3 * h * f  # q, k, v, o: 4 * 16_777_216; gate, up, down: 135_266_304
    assert n_layer == 202_375_168
    n = L * n_layer + h * V  # 6_476_005_376 + 131_072_000 (output layer; embedding: no GEMM)
    assert n == 6_607_077_376
    dense = 6 * n  # 39_642_464_256 per token
    attention = 6 * L * s * h  # 3_221_225_472 per token
    per_token = dense + attention
    assert per_token == 42_863_689_728
    tokens = s * 1
    expected = per_token * tokens
    assert expected == 175_569_673_125_888  # 1.756e14 FLOPs = 175.6 TFLOP per sequence
    assert num_floating_point_operations(LLAMA2_7B, s, 1) == expected
    assert num_floating_point_operations(LLAMA2_7B, s, 8) == 8 * expected
    # the attention term alone
    assert effective_attention_flops(LLAMA2_7B, [[s]]) == attention * tokens
    # TP pads the vocabulary as Megatron-LM (a multiple of 128 x TP: 32000 -> 32000 for tp=2,
    # 32001 -> 32256): only the logits term changes
    padded = ModelConfig(**{**LLAMA2_7B.__dict__, "vocab_size": 32001})
    assert (num_floating_point_operations(padded, s, 1, tp=2) - expected
            == 6 * h * 256 * tokens)


def test_effective_attention_with_documents():
    s = 4096
    full = effective_attention_flops(LLAMA2_7B, [[s]])
    assert full == 6 * 32 * 4096 * s * s  # 6 L q s^2, the seq^2 figure
    for k in (2, 4, 8, 16):
        assert effective_attention_flops(LLAMA2_7B, [[s // k] * k]) == pytest.approx(full / k)
    # samples add up; unequal documents sit between the extremes
    two = effective_attention_flops(LLAMA2_7B, [[s], [s // 2, s // 2]])
    assert two == pytest.approx(full * 1.5)
    mixed = effective_attention_flops(LLAMA2_7B, [[3000, 1000, 96]])
    assert full / 3 < mixed < full
    # from a packed sample's doc_starts, as the dataset writes them
    tokens = np.array([5] * 9 + [0] + [6] * 20 + [0] + [7] * 33, dtype=np.int64)  # EOD = 0
    eods = np.nonzero(tokens[:-1] == 0)[0] + 1
    sample = build_sample(tokens, np.concatenate([[0], eods]), SampleOptions(63, eod=0))
    lengths = document_lengths([sample["doc_starts"]], 63)
    assert lengths == [[10, 21, 32]] and sum(lengths[0]) == 63
    assert document_lengths([[0]], 63) == [[63]]
    with pytest.raises(ValueError, match="doc_starts"):
        document_lengths([[0, 70]], 63)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA H20", 148.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA GB200", 2500.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("AMD Instinct MI300X", 1307.0),
    ("Some Future GPU", None),
])
def test_known_peaks(name, peak):
    assert known_peak_tflops(name) == peak


def test_measured_and_overridden_peak():
    measured = measure_matmul_peak_tflops(torch.float32, size=256, seconds=0.05)
    assert 1e-4 < measured < 1e4
    assert peak_tflops(torch.bfloat16, override=123.5) == 123.5
    with pytest.raises(ValueError, match="peak-tflops"):
        peak_tflops(override=0.0)
