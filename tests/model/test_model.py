"""Single-process model: forward/backward shapes and gradients, and real learning."""

import pytest
import torch
from fake_transformer_engine import install as install_fake_te
from megatron.core.transformer.enums import AttnMaskType

from megatron_longctx.config import RunConfig
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.model import build_model
from megatron_longctx.training.trainer import Trainer


def test_forward_backward(model_parallel):
    cfg = RunConfig()
    cfg.model.num_query_groups = 2
    model = build_model(cfg.model, cfg.parallel)
    tokens = torch.randint(0, 256, (2, 32))
    positions = torch.arange(32).expand(2, -1)
    loss = model(tokens, positions, None, labels=tokens)  # [b, s]
    assert loss.shape == (2, 32)
    # an untrained model is close to uniform over the padded vocab
    assert abs(loss.mean().item() - torch.log(torch.tensor(384.0)).item()) < 0.5
    loss.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() > 0 for g in grads) == len(grads)
    logits = model(tokens, positions, None)
    assert logits.shape == (2, 32, 384)


def test_causality(model_parallel):
    """Changing a later token must not change earlier logits."""
    cfg = RunConfig()
    model = build_model(cfg.model, cfg.parallel).eval()
    tokens = torch.randint(0, 256, (1, 24))
    positions = torch.arange(24)[None]
    changed = tokens.clone()
    changed[0, 16] = (changed[0, 16] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens, positions, None), model(changed, positions, None)
    assert torch.equal(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_loss_decreases_on_stdlib_corpus(model_parallel):
    cfg = RunConfig()
    cfg.training.train_iters, cfg.training.seq_length = 20, 128
    dataset = TokenStreamDataset(stdlib_token_stream(max_docs=300), cfg.training.seq_length)
    trainer = Trainer(cfg, dataset)
    losses = [trainer.train_step()["lm_loss"] for _ in range(20)]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.5, losses  # from ~5.9 (uniform) to < 4.4 nats/byte


def test_packed_documents_equal_separate_runs(model_parallel):
    """A packed sample with document-causal attention and reset positions gives each document
    exactly the logits it gets on its own (HARPE rotary, GQA)."""
    cfg = RunConfig()
    cfg.model.num_query_groups = 2
    cfg.model.rope_parameters = {"rope_type": "harpe", "harpe_bases": [1e4, 3e5]}
    model = build_model(cfg.model, cfg.parallel).eval()
    bounds = [0, 7, 8, 30, 64]
    tokens = torch.randint(0, 256, (1, 64))
    positions = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])[None]
    with torch.no_grad():
        packed = model(tokens, positions, None, doc_starts=[bounds[:-1]])
        unmasked = model(tokens, positions, None)
        for a, b in zip(bounds, bounds[1:]):
            alone = model(tokens[:, a:b], torch.arange(b - a)[None], None)
            torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-5)
    # control: without document masking later documents see earlier ones
    assert not torch.allclose(packed[:, 8:], unmasked[:, 8:], atol=1e-3)


@pytest.fixture
def fake_te(monkeypatch):
    """Transformer Engine "usable" (no GPU on CI), its attention faked with torch."""
    return install_fake_te(monkeypatch.setattr)


def test_packed_documents_on_te_thd_equal_our_attention(model_parallel, fake_te):
    """Without CP, packed documents go to TE in its THD format (two samples as one pack):
    the same loss as our blockwise path on the same weights."""
    torch.manual_seed(0)
    cfg = RunConfig()
    model = build_model(cfg.model, cfg.parallel).eval()
    starts = [[0, 7, 8, 30], [0, 40]]
    tokens = torch.randint(0, 256, (2, 64))
    positions = torch.stack([torch.cat([torch.arange(b - a) for a, b in
                                        zip(s, [*s[1:], 64])]) for s in starts])
    with torch.no_grad():
        on_te = model(tokens, positions, None, labels=tokens, doc_starts=starts)
        assert [c[0] for c in fake_te[cfg.model.num_layers:]] == ["thd"] * cfg.model.num_layers
        assert fake_te[-1][1:] == (AttnMaskType.causal, "thd")
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.te_attention = None
        ours = model(tokens, positions, None, labels=tokens, doc_starts=starts)
    torch.testing.assert_close(on_te, ours, rtol=1e-5, atol=1e-5)


def test_transformer_engine_attention_is_used_only_where_it_applies(model_parallel, fake_te):
    """With TE (faked here: no GPU on CI), plain causal attention goes to TE's kernel with the
    CP settings, packed documents too (THD format, above)."""
    calls = fake_te
    for impl, backend in (("local", "auto"), (None, "local")):  # TE not wanted: never built
        cfg = RunConfig()
        cfg.model.transformer_impl, cfg.model.attention_backend = impl, backend
        build_model(cfg.model, cfg.parallel)
        assert calls == []
    cfg = RunConfig()
    cfg.parallel.cp_comm_type = "a2a"
    model = build_model(cfg.model, cfg.parallel).eval()
    # megatron-core hands cp_comm_type to the core attention only when CP > 1
    assert model.config.cp_comm_type == "a2a" and calls[0][:2] == ("init", None)
    assert len(calls) == cfg.model.num_layers
    tokens, positions = torch.randint(0, 256, (1, 16)), torch.arange(16)[None]
    with torch.no_grad():
        model(tokens, positions, None)
        assert [c[0] for c in calls[cfg.model.num_layers:]] == ["forward"] * cfg.model.num_layers
        calls.clear()
        model(tokens, positions, None, doc_starts=[[0, 5]])
    assert [c[0] for c in calls] == ["thd"] * cfg.model.num_layers
