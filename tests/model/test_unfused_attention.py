"""--attention-backend unfused|local and Megatron-LM's dropout flags: the unfused path against a
dense float64 reference (causal, packed documents, a context-parallel chunk layout); attention
and hidden dropout act in training only, on every attention path or refused."""

import pytest
import torch
from test_blockwise_attention import dense_reference

from megatron_longctx.config import RunConfig
from megatron_longctx.model import build_model
from megatron_longctx.model.context_parallel import local_query_chunks, slice_for_cp_rank
from megatron_longctx.model.unfused_attention import unfused_attention


def qkv(s=24, b=2, h=4, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, h, d, generator=gen), torch.randn(s, b, g, d, generator=gen),
            torch.randn(s, b, g, d, generator=gen))


@pytest.mark.parametrize("doc_starts", [None, [[0, 5, 13], [0, 20]]])
def test_unfused_equals_dense_reference(doc_starts):
    q, k, v = qkv()
    scale = 8 ** -0.5
    out = unfused_attention(q, k, v, scale, [(0, 24, 0)], doc_starts)
    expected = dense_reference(q, k, v, scale, doc_starts or [[0], [0]])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_unfused_on_a_context_parallel_rank_sees_the_global_positions():
    """CP=2, rank 1 holds chunks 1 and 2 of 4 (megatron-core's load-balanced layout): its rows
    equal those rows of full attention."""
    q, k, v = qkv(s=32)
    scale, starts = 8 ** -0.5, [[0, 9, 17], [0]]
    local_q = slice_for_cp_rank(q, 1, 2, dim=0)
    out = unfused_attention(local_q, k, v, scale, local_query_chunks(1, 2, 16), starts)
    expected = slice_for_cp_rank(dense_reference(q, k, v, scale, starts), 1, 2, dim=0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_attention_dropout_drops_probabilities(model_parallel):
    q, k, v = qkv(s=64)
    plain = unfused_attention(q, k, v, 0.5, [(0, 64, 0)], None)
    torch.manual_seed(0)
    dropped = unfused_attention(q, k, v, 0.5, [(0, 64, 0)], None, dropout=0.5, fork_rng=False)
    assert not torch.allclose(dropped, plain)
    # dropout rescales by 1/(1-p): the average over many draws returns the plain output
    mean = torch.stack([unfused_attention(q, k, v, 0.5, [(0, 64, 0)], None, dropout=0.5,
                                          fork_rng=False) for _ in range(200)]).mean(0)
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean()  # unscaled: 50% off


def tiny(**model) -> RunConfig:
    cfg = RunConfig()
    cfg.model.num_query_groups = 2
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


@pytest.mark.parametrize("backend", ["unfused", "local", "flash"])
def test_backends_give_the_same_logits(model_parallel, backend):
    tokens, positions = torch.randint(0, 256, (2, 40)), torch.arange(40).expand(2, -1)
    logits = {}
    for name in ("auto", backend):
        torch.manual_seed(3)  # the same weights
        model = build_model(tiny(attention_backend=name).model, RunConfig().parallel).eval()
        with torch.no_grad():
            logits[name] = model(tokens, positions, None, doc_starts=[[0, 17], [0]])
    torch.testing.assert_close(logits[backend], logits["auto"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_flags", [
    {"attention_dropout": 0.3},  # plain causal: SDPA's dropout
    {"attention_dropout": 0.3, "attention_backend": "unfused"},
    {"hidden_dropout": 0.3},  # megatron-core's bias-dropout-add and embedding dropout
])
def test_dropout_acts_in_training_only(model_parallel, model_flags):
    tokens, positions = torch.randint(0, 256, (2, 32)), torch.arange(32).expand(2, -1)
    torch.manual_seed(5)
    model = build_model(tiny(**model_flags).model, RunConfig().parallel)
    torch.manual_seed(5)
    no_dropout = {k: v for k, v in model_flags.items() if not k.endswith("dropout")}
    reference = build_model(tiny(**no_dropout).model, RunConfig().parallel)  # same weights
    with torch.no_grad():
        model.eval(), reference.eval()
        assert torch.equal(model(tokens, positions, None), reference(tokens, positions, None))
        model.train(), reference.train()
        trained = model(tokens, positions, None, labels=tokens)
        assert not torch.allclose(trained, reference(tokens, positions, None, labels=tokens))


def test_attention_dropout_with_documents_needs_the_unfused_backend():
    cfg = tiny(attention_dropout=0.1)
    cfg.data.data_path, cfg.training.train_iters = ["stdlib"], 1
    cfg.data.reset_attention_mask = True
    with pytest.raises(ValueError, match="--attention-backend unfused"):
        cfg.validate(world_size=1)
    cfg.model.attention_backend = "unfused"
    cfg.validate(world_size=1)
