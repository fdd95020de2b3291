"""--optimizer sgd (with --sgd-momentum): megatron-core's SGD, checked against the update
written out by hand (PyTorch's SGD with momentum and coupled weight decay)."""

import torch

from megatron_longctx.arguments import parse_config
from megatron_longctx.data.token_dataset import TokenStreamDataset, stdlib_token_stream
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
