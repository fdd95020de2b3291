"""Shared by the tests in tests/gpu/: the CUDA skip, the stated tolerances, and the references
of the CPU tests (tests/model, tests/training), reused rather than copied.

Tolerances are relative: ``max |x - ref| / max |ref|`` against float64 on the same (rounded)
inputs. fp32 (TF32 off): 2e-4; bf16 (8-bit mantissa, 2^-8 = 3.9e-3 per rounding; softmax and
sums in fp32 inside the kernels): 2e-2 for outputs, 3e-2 for gradients (one more GEMM).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
for sub in ("model", "training"):  # the CPU tests' references: test_blockwise_attention, ...
    if os.path.join(TESTS, sub) not in sys.path:
        sys.path.insert(0, os.path.join(TESTS, sub))

REASON = ("needs a CUDA GPU (tests/gpu checks the GPU branches: SDPA/FlexAttention/blockwise/"
          "unfused attention forward and backward, TE spec, bf16 training, 128k loss); "
          "run tests/gpu/run.sh on a GPU machine")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=REASON)

TOLERANCE = {  # dtype -> (output, gradients)
    torch.float32: (2e-4, 2e-4),
    torch.bfloat16: (2e-2, 3e-2),
}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the largest reference value (float64 arithmetic)."""
    ref = ref.detach().double().cpu()
    return ((x.detach().double().cpu() - ref).abs().max() / ref.abs().max()).item()
