"""Save/resume under a parallel layout; resume under another.

    torchrun --nproc_per_node 2 checkpoint_worker.py OUT_DIR
Runs (a) 4 uninterrupted steps, (b) 2 steps + save, then a fresh trainer that resumes and runs
steps 3-4, (c) a resume of (b)'s checkpoint under a different layout (TP=2 -> PP=2), and (a)/(b)
again with the distributed optimizer (DP=2). Writes losses as JSON.
"""

import json
import os
import sys

import torch.distributed as dist

from megatron_longctx.config import RunConfig
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
from megatron_longctx.training.checkpoint import (
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_longctx.training.trainer import Trainer


def config(**parallel) -> RunConfig:
    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]  # the trainer gets its dataset directly; validate() wants one
    cfg.model.num_layers, cfg.model.num_query_groups = 2, 2
    # Megatron-LM pads the vocabulary to a multiple of 128 x TP, so TP=1 and TP=2 would differ in
    # padding rows, whose logits enter the loss; divisor 1 pads 258 (260) the same at both
    cfg.model.make_vocab_size_divisible_by = 1
    cfg.training.seq_length, cfg.training.train_iters = 64, 4
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def trainer(cfg: RunConfig) -> Trainer:
    cfg.validate(dist.get_world_size())
    initialize_model_parallel(cfg.parallel, cfg.training.seed)
    return Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=30), 64))


def uninterrupted_and_resumed(layout: dict, ckpt: str) -> tuple[list[float], list[float]]:
    """Losses of 4 straight steps, and of 2 steps + save + a fresh trainer resuming 2 more."""
    straight = trainer(config(**layout))
    uninterrupted = [straight.train_step()["lm_loss"] for _ in range(4)]
    first = trainer(config(**layout))  # same seed and layout: same initial weights
    before = [first.train_step()["lm_loss"] for _ in range(2)]
    save_checkpoint(first, ckpt)
    resumed = trainer(config(**layout))
    assert load_checkpoint(resumed, resolve_checkpoint(ckpt)) == 2 and resumed.step == 2
    return uninterrupted, before + [resumed.train_step()["lm_loss"] for _ in range(2)]


def main(out: str) -> None:
    init_process_group()
    tp2 = dict(tensor_model_parallel_size=2)
    uninterrupted, resumed = uninterrupted_and_resumed(tp2, os.path.join(out, "ckpt"))
    other = trainer(config(pipeline_model_parallel_size=2))  # TP=2 checkpoint -> PP=2 run
    assert load_checkpoint(other, resolve_checkpoint(os.path.join(out, "ckpt"))) == 2
    resharded = resumed[:2] + [other.train_step()["lm_loss"] for _ in range(2)]
    # distributed optimizer (DP=2), resumed in the same layout
    d_uninterrupted, d_resumed = uninterrupted_and_resumed(
        dict(use_distributed_optimizer=True), os.path.join(out, "ckpt_distopt"))
    if dist.get_rank() == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({"uninterrupted": uninterrupted, "resumed": resumed,
                       "resharded": resharded, "distopt_uninterrupted": d_uninterrupted,
                       "distopt_resumed": d_resumed}, f)


if __name__ == "__main__":
    main(sys.argv[1])
