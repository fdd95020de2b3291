"""--optimizer sgd (with --sgd-momentum): megatron-core's SGD, checked against the update
written out by hand (PyTorch's SGD with momentum and coupled weight decay)."""

import torch

from megatron_longctx.arguments import parse_config
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.training.trainer import Trainer


def test_sgd_with_momentum_updates_as_written_out(model_parallel):
    cfg, _ = parse_config(["--data-path", "stdlib", "--optimizer", "sgd", "--sgd-momentum",
                           "0.8", "--lr", "0.05", "--weight-decay", "0.1", "--clip-grad", "0",
                           "--lr-decay-style", "constant", "--train-iters", "2",
                           "--num-layers", "1", "--seq-length", "32"])
    trainer = Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=5), 32))
    params = dict(trainer.model.named_parameters())
    expected = {n: p.detach().double().clone() for n, p in params.items()}
    momentum = {}
    for step in range(2):
        trainer.forward_backward(step)
        for name, p in params.items():
            # megatron-core: no weight decay on biases and 1-D weights (norms)
            decay = 0.0 if p.ndim == 1 else 0.1
            grad = p.main_grad.double() + decay * expected[name]
            momentum[name] = grad if step == 0 else 0.8 * momentum[name] + grad
            expected[name] -= 0.05 * momentum[name]
        ok, _, _ = trainer.optimizer.step()
        assert ok
    for name, p in params.items():
        torch.testing.assert_close(p.detach().double(), expected[name], rtol=1e-6, atol=1e-7,
                                   msg=name)
    assert type(trainer.optimizer.optimizer).__name__ == "SGD"


def test_grad_reduce_in_bf16_keeps_bf16_gradients(model_parallel):
    """--grad-reduce-in-bf16 (Megatron-LM): with --bf16 the DDP gradient buffer is bf16
    (fp32 by default), a step still trains, and the memory estimate counts 2 bytes a
    gradient; without --bf16 it is refused."""
    import pytest

    from megatron_longctx.training.memory import stage_memory

    flags = ["--data-path", "stdlib", "--train-iters", "2", "--num-layers", "1",
             "--seq-length", "32", "--bf16"]
    sizes = {}
    for extra in ([], ["--grad-reduce-in-bf16"]):
        cfg, _ = parse_config(flags + extra)
        cfg.validate(1)
        trainer = Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=5), 32))
        trainer.forward_backward(0)
        grads = [p.main_grad for p in trainer.model.parameters()]
        assert {g.dtype for g in grads} == ({torch.bfloat16} if extra else {torch.float32})
        assert all(torch.isfinite(g.float()).all() and g.abs().sum() > 0 for g in grads)
        sizes[bool(extra)] = stage_memory(cfg, 1, 0)["gradients"]
    assert sizes[True] * 2 == sizes[False]
    cfg, _ = parse_config(flags[:-1] + ["--grad-reduce-in-bf16"])
    with pytest.raises(ValueError, match="--grad-reduce-in-bf16 .* needs --bf16"):
        cfg.validate(1)
