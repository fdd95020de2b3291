"""The whole model on CUDA: the Transformer Engine layer spec against the local spec (same
weights moved through a checkpoint in both directions, and through full tensors), and packed
documents through the default attention (FlexAttention without TE, blockwise with it) against
the unfused path, loss and gradients, with HARPE rotary."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gpu_helpers import REASON, rel
from megatron.core import dist_checkpointing

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig
from megatron_longctx.model import CausalLM, build_model
from megatron_longctx.model.gpu_kernels import transformer_engine_spec_provider
from megatron_longctx.model.sharding import full_tensors, load_full_state_dict
from megatron_longctx.training.checkpoint import save_weights
from megatron_longctx.training.checkpoint_schema import drop_absent_extra_state, load_model_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=REASON)


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                num_query_groups=2, vocab_size=1000,
                rope_parameters={"rope_type": "harpe", "harpe_bases": [1e4, 3e5]})
    return ModelConfig(**{**base, **kw})


def tokens(s: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (2, s), generator=gen).cuda()


def move(source, target, cfg: ModelConfig, path) -> None:
    """``source``'s weights into ``target`` through a checkpoint, as a resume reads it."""
    ckpt = save_weights(source, RunConfig(model=cfg), str(path), step=1)
    request = drop_absent_extra_state(target.sharded_state_dict(), ckpt)
    load_model_state(target, dist_checkpointing.load({"model": request}, ckpt)["model"])


@torch.no_grad()
def logits(model, cfg: ModelConfig) -> torch.Tensor:
    return CausalLM(model, cfg).eval()(tokens())


def test_te_spec_logits_equal_local_spec(model_parallel, tmp_path):
    if transformer_engine_spec_provider() is None:
        pytest.skip("Transformer Engine is not installed here: only the local spec exists "
                    "(the spec choice is tested on CPU, tests/model/test_layer_spec.py)")
    local_cfg, te_cfg = tiny(transformer_impl="local"), tiny(transformer_impl="transformer_engine")
    local = build_model(local_cfg, ParallelConfig())
    te = build_model(te_cfg, ParallelConfig())
    qkv = te.decoder.layers[0].self_attention.linear_qkv
    assert type(qkv).__name__ == "TELayerNormColumnParallelLinear" and hasattr(
        qkv, "layer_norm_weight")
    assert type(te.decoder.layers[0].input_layernorm).__name__ == "IdentityOp"
    move(local, te, local_cfg, tmp_path / "local")  # local checkpoint -> TE model
    expected = logits(local, local_cfg)
    assert rel(logits(te, te_cfg), expected) <= 2e-3  # fp32: fused norm+GEMM vs torch
    back = build_model(local_cfg, ParallelConfig())
    move(te, back, te_cfg, tmp_path / "te")  # TE checkpoint -> local model
    assert torch.equal(logits(back, local_cfg), expected)  # the very same weights
    # bf16, weights handed over as full tensors (the norms under the local names)
    local16 = build_model(local_cfg, ParallelConfig(), bf16=True)
    te16 = build_model(te_cfg, ParallelConfig(), bf16=True)
    load_full_state_dict(te16, full_tensors(local16))
    assert full_tensors(te16).keys() == full_tensors(local16).keys()
    assert rel(logits(te16, te_cfg), logits(local16, local_cfg)) <= 3e-2


def test_documents_default_attention_equal_unfused(model_parallel):
    cfg = tiny()
    fast = build_model(cfg, ParallelConfig(), bf16=True)  # flex (no TE) or blockwise (TE)
    slow = build_model(dataclasses.replace(cfg, attention_backend="unfused"), ParallelConfig(),
                       bf16=True)
    load_full_state_dict(slow, full_tensors(fast))
    ids = tokens(512)
    positions = torch.arange(512, device="cuda").expand(2, -1)
    labels = torch.roll(ids, -1, dims=1)
    starts = [[0, 40, 41, 300], [0, 256]]
    results = []
    for model in (fast, slow):
        model.zero_grad(set_to_none=True)
        loss = model(ids, positions, None, labels=labels, doc_starts=starts)  # [b, s]
        loss.float().mean().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters()
                 if "layers.0.self_attention" in n}
        results.append((loss.detach().float(), grads))
    (loss, grads), (ref_loss, ref_grads) = results
    assert rel(loss, ref_loss) <= 2e-2
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert rel(grad, ref_grads[name]) <= 5e-2, name
