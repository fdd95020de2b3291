"""Chunked output layer + cross entropy: equal to the plain full-logits loss and gradients
(single process, TP=2 with and without sequence parallelism, CP=2), and bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_longctx.arguments import parse_config
from megatron_longctx.config import RunConfig, TrainingConfig
from megatron_longctx.model import build_model
from megatron_longctx.model.chunked_loss import chunked_cross_entropy, logits_chunk_tokens

from distributed import ROOT, run_torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``F.cross_entropy`` of the full logits: hidden ``[s, b, h]``, labels ``[b, s]`` ->
    ``[b, s]``."""
    logits = (hidden @ weight.t()).to(dtype)  # [s, b, v]
    s, b, v = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, v), labels.t().reshape(-1), reduction="none")
    return loss.view(s, b).t()


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def loss_and_grads(fn, hidden, weight, labels, grad_out):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels)
    (loss * grad_out).sum().backward()  # the caller's loss mask: zero on masked tokens
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("chunk", [8, 7, 1000])  # divides s*b = 48, does not, one chunk
def test_equals_plain_cross_entropy(dtype, tol, chunk):
    torch.manual_seed(0)
    s, b, h, v = 24, 2, 16, 50
    hidden = torch.randn(s, b, h).to(dtype)
    weight = (torch.randn(v, h) * 0.5).to(dtype)
    labels = torch.randint(0, v, (b, s))
    mask = (torch.rand(b, s) > 0.3).to(torch.float64)
    grad_out = mask * torch.rand(b, s, dtype=torch.float64)
    # the truth: float64 on the same (possibly bf16-rounded) values
    ref = loss_and_grads(lambda x, w, y: plain_loss(x, w, y, torch.float64),
                         hidden.double(), weight.double(), labels, grad_out)
    got = loss_and_grads(lambda x, w, y: chunked_cross_entropy(x, w, y, chunk),
                         hidden, weight, labels, grad_out.to(torch.promote_types(dtype,
                                                                                  torch.float32)))
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)
    assert got[1].dtype == got[2].dtype == dtype
    errors = [rel(g, r) for g, r in zip(got, ref)]
    print(f"{dtype} chunk {chunk}: max rel error loss/grad hidden/grad weight {errors}")
    assert max(errors) <= tol, errors
    masked = mask.t() == 0  # [s, b]
    assert masked.any() and (got[1][masked] == 0).all()  # no gradient from masked tokens
    if dtype == torch.bfloat16:  # no worse than the unchunked bf16 computation
        bf16 = loss_and_grads(plain_loss, hidden, weight, labels, grad_out.float())
        assert max(errors) <= 2 * max(rel(g, r) for g, r in zip(bf16, ref)) + 1e-6


def test_chunk_size_rule():
    assert logits_chunk_tokens(0, 131072, 128256) == 0  # off
    assert logits_chunk_tokens(64, 100, 384) == 64  # explicit
    assert logits_chunk_tokens(None, 2 * 32, 384) == 0  # 96 KiB of logits: plain
    assert logits_chunk_tokens(None, 2048, 131072) == 0  # exactly 1 GiB: plain
    assert logits_chunk_tokens(None, 2049, 131072) == 512  # 512 x 131072 x 4 B = 256 MiB
    assert logits_chunk_tokens(None, 16384, 128256) == 523  # 7.8 GiB of fp32 logits
    assert logits_chunk_tokens(None, 131072, 128256 // 8) == 4185  # TP=8
    cfg, _ = parse_config(["--cross-entropy-chunk-size", "0"])
    assert cfg.training.cross_entropy_chunk_size == 0
    assert RunConfig().training.cross_entropy_chunk_size is None
    with pytest.raises(ValueError, match="--cross-entropy-chunk-size"):
        TrainingConfig(train_iters=1, cross_entropy_chunk_size=-1).validate(1)


@pytest.mark.parametrize("untie", [True, False])
def test_model_loss_and_grads_equal_unchunked(model_parallel, untie):
    cfg = RunConfig()
    cfg.model.num_query_groups = 2
    cfg.model.untie_embeddings_and_output_weights = untie
    cfg.training.cross_entropy_chunk_size = 0
    model = build_model(cfg.model, cfg.parallel, training=cfg.training)
    assert model.cross_entropy_chunk_size == 0
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 32))
    labels = torch.randint(0, 256, (2, 32))
    positions = torch.arange(32).expand(2, -1)
    mask = (torch.rand(2, 32) > 0.25).float()

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=labels)  # [b, s]
        (loss * mask).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run()
    model.cross_entropy_chunk_size = 7  # 64 tokens: 9 chunks, the last one short

    def no_full_logits(*args, **kwargs):
        raise AssertionError("the output layer ran on the full sequence")

    model.output_layer.forward = no_full_logits
    loss, grads = run()
    assert loss.shape == (2, 32)
    errors = {"loss": rel(loss, ref_loss), **{n: rel(g, ref_grads[n]) for n, g in grads.items()}}
    print("model max rel errors:", max(errors.values()))
    assert max(errors.values()) <= 1e-5, errors
    weight = model.shared_embedding_or_output_weight() if not untie else model.output_layer.weight
    assert weight.grad.abs().sum() > 0


def test_tensor_and_context_parallel_equal_single_process(tmp_path):
    """One torchrun launch: TP=2 (with and without SP) function-level, CP=2 and TP=2+SP
    model-level, each against the single-process computation on the same weights."""
    out = tmp_path / "result.json"
    run_torchrun(os.path.join(HERE, "chunked_loss_worker.py"), 2, str(out), timeout=300)
    results = json.loads(out.read_text())
    print(results)
    assert set(results) == {"tp2", "tp2_sp", "cp2_model", "tp2_sp_model"}
    for name, errors in results.items():
        assert max(errors.values()) <= 1e-5, (name, errors)


def test_memory_stays_bounded_at_128k_vocab():
    """16384 tokens x 128256 vocab: the fp32 logits alone would be 7.8 GiB."""
    code = r"""
import json, resource, torch
import torch.nn.functional as F
from megatron_longctx.model.chunked_loss import chunked_cross_entropy, logits_chunk_tokens
torch.manual_seed(0)
n, v, h = 16384, 128256, 64
hidden = torch.randn(n, 1, h).requires_grad_()  # [s, b, h]
weight = (torch.randn(v, h) * 0.05).requires_grad_()
labels = torch.randint(0, v, (1, n))
mask = (torch.rand(1, n) > 0.1).float()
chunk = logits_chunk_tokens(None, n, v)
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * 4096  # resident bytes now
loss = chunked_cross_entropy(hidden, weight, labels, chunk)
(loss * mask).sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
head = F.cross_entropy(hidden[:64, 0].detach() @ weight.detach().t(), labels[0, :64],
                       reduction="none")
print(json.dumps({"chunk": chunk, "base_gib": base / 2**30, "peak_gib": peak / 2**30,
                  "loss_err": (loss[0, :64] - head).abs().max().item(),
                  "grads_finite": bool(torch.isfinite(hidden.grad).all()
                                       and torch.isfinite(weight.grad).all())}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["chunk"] == 523 and result["grads_finite"]
    assert result["loss_err"] < 1e-4
    assert result["peak_gib"] - result["base_gib"] < 1.5, result
