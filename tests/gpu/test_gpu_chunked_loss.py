"""The chunked output layer + loss at 128k tokens on a GPU, Llama 3's 128256-token vocabulary,
bf16: equal to plain cross entropy on a slice (loss and the slice's hidden-state gradient,
which depend only on its own tokens), finite weight gradients, and peak memory bounded by
chunks: the full fp32 logits alone would be 64 GiB."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import REASON, TOLERANCE, rel
from test_chunked_loss import plain_loss

from megatron_longctx.model.chunked_loss import chunked_cross_entropy, logits_chunk_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=REASON)

TOKENS, VOCAB, HIDDEN, SLICE = 131072, 128256, 1024, 2048
GIB = 2**30


def test_chunked_loss_at_128k_tokens_bounded_and_exact():
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(TOKENS, 1, HIDDEN, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * 0.02).bfloat16()
    labels = torch.randint(0, VOCAB, (1, TOKENS), device="cuda", generator=gen)
    mask = (torch.rand(1, TOKENS, device="cuda", generator=gen) > 0.1).float()
    hidden.requires_grad_()
    weight.requires_grad_()
    chunk = logits_chunk_tokens(None, TOKENS, VOCAB)
    assert 0 < chunk < 1024  # automatic sizing: at most 256 MiB of fp32 logits per chunk
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = chunked_cross_entropy(hidden, weight, labels, chunk)  # [1, s] fp32
    (loss * mask).sum().backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / GIB
    # the gradients themselves (hidden 0.25 GiB, weight 0.24 GiB bf16, its fp32 sum 0.49
    # GiB) plus the per-token statistics and a few chunk-sized temporaries (0.25 GiB each)
    print(f"chunk {chunk} tokens, peak above inputs {extra:.2f} GiB")
    assert extra < 3.0, extra
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()

    part = hidden.detach()[:SLICE].clone().requires_grad_()  # [SLICE, 1, h]
    ref = plain_loss(part.double(), weight.detach().double(), labels[:, :SLICE],
                     torch.float64)  # [1, SLICE]
    (ref * mask[:, :SLICE].double()).sum().backward()
    tol_out, tol_grad = TOLERANCE[torch.bfloat16]
    assert rel(loss[:, :SLICE], ref) <= tol_out
    assert rel(hidden.grad[:SLICE], part.grad) <= tol_grad
