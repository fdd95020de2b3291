"""Train a tiny model for a few steps under several parallel layouts on the same weights/data.

    python layout_worker.py reference OUT.pt          # single process: weights, losses, grads
    torchrun --nproc_per_node 2 layout_worker.py layouts REF.pt OUT_DIR

Each layout loads the reference's initial full weights, records the loss of global batches
0..3 (batch 3 is seen after 3 optimizer steps) and the step-0 gradients gathered across TP.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_longctx.config import RunConfig
from megatron_longctx.data.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.model.sharding import full_tensors, local_parameters
from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
from megatron_longctx.training.trainer import Trainer

STEPS = 4
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    # one base per KV group; 2 groups over TP=2 puts a different base on each rank
    "harpe": {"rope_type": "harpe", "harpe_bases": [1e4, 5e5]},
}
# name -> (rope, parallel layout)
LAYOUTS = {
    "tp2": ("default", dict(tensor_model_parallel_size=2)),
    "tp2_sp": ("default", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "pp2": ("default", dict(pipeline_model_parallel_size=2)),
    "dp2": ("default", dict()),
    "dp2_distopt": ("default", dict(use_distributed_optimizer=True)),
    "tp2_harpe": ("harpe", dict(tensor_model_parallel_size=2)),
    "pp2_harpe": ("harpe", dict(pipeline_model_parallel_size=2)),
}


def config(rope: str = "default", **parallel) -> RunConfig:
    cfg = RunConfig()
    m, t = cfg.model, cfg.training
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 4, 64, 128
    m.num_attention_heads, m.num_query_groups = 4, 2
    m.rope_parameters = ROPES[rope]
    t.seq_length, t.micro_batch_size, t.global_batch_size = 64, 2, 8  # 4 micro-batches at DP=1
    t.train_iters, t.lr, t.min_lr, t.lr_warmup_iters = STEPS, 1e-3, 1e-4, 1
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def dataset(cfg: RunConfig):
    return TokenStreamDataset(stdlib_token_stream(max_docs=40), cfg.training.seq_length)


def step0_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    loss = trainer.forward_backward(0)
    params = local_parameters(trainer.model)
    grads = {n: p.main_grad.detach().clone() for n, p in params.items()}
    return loss, full_tensors(trainer.model, grads)


def train_losses(trainer: Trainer) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(STEPS)]


def reference(out: str) -> None:
    init_process_group()
    refs = {}
    for rope in ROPES:
        cfg = config(rope)
        cfg.validate(1)
        initialize_model_parallel(cfg.parallel, cfg.training.seed)
        trainer = Trainer(cfg, dataset(cfg))
        init_state = {n: t.clone() for n, t in full_tensors(trainer.model).items()}
        loss0, grads = step0_grads(trainer)
        refs[rope] = {"state": init_state, "loss0": loss0, "grads": grads,
                      "losses": train_losses(trainer)}
    torch.save(refs, out)


def layouts(ref_path: str, out_dir: str) -> None:
    init_process_group()
    refs = torch.load(ref_path)
    results = {}
    for name, (rope, parallel) in LAYOUTS.items():
        ref = refs[rope]
        cfg = config(rope, **parallel)
        cfg.validate(dist.get_world_size())
        initialize_model_parallel(cfg.parallel, cfg.training.seed)
        trainer = Trainer(cfg, dataset(cfg), init_state_dict=ref["state"])
        result = {}
        if not cfg.parallel.use_distributed_optimizer:  # grads stay whole only without it
            loss0, grads = step0_grads(trainer)
            result["loss0_diff"] = abs(loss0 - ref["loss0"])
            result["grad_max_abs_diff"] = max(
                (g - ref["grads"][n]).abs().max().item() for n, g in grads.items())
            result["grad_max_abs"] = max(ref["grads"][n].abs().max().item() for n in grads)
            result["num_grads_compared"] = len(grads)
        losses = train_losses(trainer)
        result["losses"] = losses
        result["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(losses, ref["losses"]))
        results[name] = result
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "reference":
        reference(sys.argv[2])
    else:
        layouts(sys.argv[2], sys.argv[3])
