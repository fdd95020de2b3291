"""Mixed precision and fusions as Megatron-LM sets them up: bf16 weights with fp32 main
weights in the distributed optimizer (an update below bf16's resolution lives in the fp32
copy), and gradient-accumulation fusion only where its kernels exist and under DDP."""

import torch

from megatron_longctx.arguments import parse_config
from megatron_longctx.config import ModelConfig, ParallelConfig
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.model import gpt, gpu_kernels
from megatron_longctx.training import trainer as trainer_module
from megatron_longctx.training.trainer import Trainer


def test_bf16_distributed_optimizer_keeps_fp32_main_weights(model_parallel, monkeypatch):
    built = {}
    real_build = trainer_module.build_model

    def spy(*args, **kwargs):
        built.update(kwargs)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_model", spy)
    cfg, _ = parse_config(["--data-path", "stdlib", "--bf16", "--use-distributed-optimizer",
                           "--lr", "1e-6", "--min-lr", "1e-6", "--lr-decay-style", "constant",
                           "--weight-decay", "0", "--clip-grad", "0", "--train-iters", "2",
                           "--num-layers", "1", "--seq-length", "32"])
    trainer = Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=5), 32))
    assert built["grad_accumulation_fusion"]  # asked for under DDP ...
    assert not trainer.model.config.gradient_accumulation_fusion  # ... no kernels on CPU
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])[0]
    assert type(inner).__name__ == "DistributedOptimizer"
    params = [p for group in inner.model_float16_groups for p in group]
    mains = [m for group in inner.shard_fp32_from_float16_groups for m in group]
    assert len(params) == len(mains) == len(list(trainer.model.parameters()))
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {m.dtype for m in mains} == {torch.float32}
    assert all(p.main_grad.dtype == torch.float32 for p in params)  # fp32 grad buffers
    before_main = [m.clone() for m in mains]
    before_param = [p.detach().clone() for p in params]
    trainer.train_step()
    moved_main = sum((m != b).sum().item() for m, b in zip(mains, before_main))
    moved_param = sum((p.detach() != b).sum().item() for p, b in zip(params, before_param))
    total = sum(m.numel() for m in mains)
    # Adam's first step moves every weight with a gradient (not the embedding rows of unseen
    # tokens) by ~lr = 1e-6, far below bf16's resolution (2^-8 relative): the fp32 copies
    # move, the bf16 weights mostly do not
    assert moved_main > 0.5 * total and moved_param < 0.05 * total, (moved_main, moved_param)
    for p, m in zip(params, mains):  # the model holds the rounded fp32 copy (DP=1: all of it)
        assert torch.equal(p.detach().view(-1), m.to(torch.bfloat16))


def test_gradient_accumulation_fusion_only_with_its_kernels(monkeypatch):
    model = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                        vocab_size=260, transformer_impl="local")
    assert not gpu_kernels.gradient_accumulation_fusion_available()  # CPU
    assert not gpt.transformer_config(model, ParallelConfig(),
                                      grad_accumulation_fusion=True).gradient_accumulation_fusion
    # a GPU with apex's fused wgrad kernel (megatron-core's own flag says so)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)
    assert gpu_kernels.gradient_accumulation_fusion_available()
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    assert not gpu_kernels.gradient_accumulation_fusion_available()
    monkeypatch.setattr(gpt, "gradient_accumulation_fusion_available", lambda: True)
    monkeypatch.setattr(gpt, "use_transformer_engine", lambda impl: False)
    assert gpt.transformer_config(model, ParallelConfig(),
                                  grad_accumulation_fusion=True).gradient_accumulation_fusion
    assert not gpt.transformer_config(model, ParallelConfig()).gradient_accumulation_fusion
