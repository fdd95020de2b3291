"""FLOPs of a training iteration and the peak they are divided by (MFU).

The one FLOPs estimator of the project (metrics/MFU, planner, benchmarks): Megatron-LM's
``num_floating_point_operations`` (megatron/training/training.py, tag ``core_v0.16.1``),
specialised to our Llama-style decoder (GQA, SwiGLU, ``kv_channels``, untied or tied output
layer; no MoE, MTP or MLA). Like Megatron-LM it counts model FLOPs (GEMMs only, no recompute,
no norms, rotary, softmax or loss), so FLOPs / (time x peak) is MFU, not HFU.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import torch

from megatron_longctx.config import ModelConfig
from megatron_longctx.model.gpt import padded_vocab_size

_FWD_BWD = 3  # every GEMM runs in the forward, the data-gradient and the weight-gradient pass
_FMA = 2  # an (m x k) @ (k x n) GEMM is 2mkn floating-point operations


def _forward_linear_flops_per_token(model: ModelConfig, tp: int) -> float:
    """Forward FLOPs per token of the weight GEMMs: QKV, attention output, MLP and logits."""
    h = model.hidden_size
    q = model.head_dim * model.num_attention_heads  # query projection size
    kv = model.head_dim * model.query_groups  # key (and value) projection size
    attention = h * (q + 2 * kv) + q * h
    mlp = 3 * h * model.ffn_hidden_size  # SwiGLU: h -> 2f (gate, up) and f -> h (down)
    logits = h * padded_vocab_size(model.vocab_size, tp, model.make_vocab_size_divisible_by)
    return _FMA * (model.num_layers * (attention + mlp) + logits)


def effective_attention_flops(model: ModelConfig, doc_lengths: Sequence[Sequence[int]]
                              ) -> float:
    """Attention-score FLOPs (``QK^T`` and ``(QK^T)V``, forward + backward) of one iteration
    whose sample ``i`` packs documents of lengths ``doc_lengths[i]`` (attention stays inside
    each document).

    Megatron-LM's causal convention: a document of ``n`` tokens costs the half ``n^2 / 2`` of
    its score matrix (not ``n (n + 1) / 2``), so ``[[s]] * b`` gives exactly the attention term
    of :func:`num_floating_point_operations` and ``k`` equal documents cost ``1 / k`` of it.
    """
    return attention_flops(model, sum(n * n for lengths in doc_lengths for n in lengths))


def attention_flops(model: ModelConfig, squares: float) -> float:
    """:func:`effective_attention_flops` from ``sum(n^2)`` over the iteration's documents."""
    q = model.head_dim * model.num_attention_heads
    # per layer: two GEMMs over the causal half of each (n x n) score matrix, q wide
    return _FWD_BWD * _FMA * 2 * q * model.num_layers * squares / 2


def document_lengths(doc_starts: Sequence[Sequence[int]], seq_length: int) -> list[list[int]]:
    """Per-sample document lengths from packed samples' ``doc_starts`` (each sorted, from 0),
    the key :func:`megatron_longctx.data.samples.long_context_dataset.build_sample` writes."""
    lengths = []
    for starts in doc_starts:
        bounds = [int(x) for x in starts] + [seq_length]
        if bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"doc_starts {list(starts)} must be increasing, start at 0 and "
                             f"stay below seq_length {seq_length}")
        lengths.append([b - a for a, b in zip(bounds, bounds[1:])])
    return lengths


def num_floating_point_operations(model: ModelConfig, seq_length: int, batch_size: int,
                                  tp: int = 1) -> float:
    """FLOPs of one training iteration (forward + backward) over ``batch_size`` sequences.

    Per token and layer (``h`` hidden, ``q``/``kv`` query/key projection sizes, ``f`` FFN,
    ``s`` sequence, ``V`` vocabulary padded for ``tp``)::

        6 * (h * (q + 2 kv) + q * h + 3 h f + q * s)      plus, once, 6 * h * V (logits)

    The ``q * s`` term is causal attention as Megatron-LM counts it since mid-2025 and at
    ``core_v0.16.1``: ``2 (QK^T, (QK^T)V) * q * s / 2`` (only half of the score matrix is
    needed; older releases and ``torch.utils.flop_counter`` count the full ``s x s``, twice
    this). Every sequence is one document; :func:`effective_attention_flops` gives the
    document-masked figure. The count is for the whole model (all TP/PP/CP ranks):
    divide by the number of GPUs for a per-GPU throughput.
    """
    linear = _FWD_BWD * _forward_linear_flops_per_token(model, tp) * seq_length * batch_size
    return linear + effective_attention_flops(model, [[seq_length]] * batch_size)


# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' data sheets,
# keyed by the name torch.cuda.get_device_name() contains (longest matching key wins).
KNOWN_PEAK_TFLOPS: dict[str, float] = {
    "V100": 125.0,  # fp16 only (no bf16)
    "A10": 125.0,
    "A40": 149.7,
    "RTX A6000": 154.8,
    "A100": 312.0,
    "A800": 312.0,
    "L4": 121.0,
    "L40": 181.0,
    "L40S": 362.0,
    "H20": 148.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,
    "H200": 989.0,  # SXM
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "B100": 1750.0,
    "B200": 2250.0,
    "GB200": 2500.0,
    "MI250X": 383.0,
    "MI300X": 1307.0,
    "MI325X": 1307.0,
}


def known_peak_tflops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name, or None when no key matches."""
    matches = [key for key in KNOWN_PEAK_TFLOPS
               if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])",
                            device_name.lower())]
    return KNOWN_PEAK_TFLOPS[max(matches, key=len)] if matches else None


def measure_matmul_peak_tflops(dtype: torch.dtype = torch.float32, size: int | None = None,
                               device: str | torch.device | None = None,
                               seconds: float = 0.5) -> float:
    """Best TFLOP/s of square ``size x size`` matmuls timed for about ``seconds``.

    Default size: 2048 on the CPU (big enough for AMX/AVX-512 to reach their rate), 8192 on
    GPUs. This is what the CPU can actually do, the fair MFU denominator where no data-sheet
    peak applies.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    inner = 10 if device.type == "cuda" else 1  # keep kernel launches and syncs out of the time
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.matmul(a, b)  # warm-up: kernel selection, AMX tile setup

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = float("inf")
    sync()
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync()
        now = time.perf_counter()
        best = min(best, (now - start) / inner)
        if now > deadline:
            break
    return 2.0 * size**3 / best / 1e12


def peak_tflops(dtype: torch.dtype = torch.bfloat16, override: float | None = None) -> float:
    """The MFU denominator: ``override`` (``--peak-tflops``) if given; else on a GPU in the
    table the data-sheet bf16/fp16 peak; else (CPU, unknown GPU, fp32) a measured matmul peak.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return float(override)
    if torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        known = known_peak_tflops(torch.cuda.get_device_name())
        if known is not None:
            return known
    return measure_matmul_peak_tflops(dtype)
