"""A tiny training run on 4 processes under DP=4, TP=2 (x DP=2), the same with a loader
worker, and PP=4, counting the samples each rank reads (``__getitem__``, also in loader
workers), on the same weights and data.

    torchrun --nproc_per_node 4 batch_broadcast_worker.py OUT_DIR

Writes ``OUT_DIR/rank{r}.json``: per run, the train and validation reads of this rank (sample
indices in reading order) and the metrics of each step and of one evaluation.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from megatron_longctx.config import RunConfig
from megatron_longctx.data.samples.long_context_dataset import SampleOptions
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
from megatron_longctx.model.sharding import full_tensors
from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
from megatron_longctx.training.trainer import Trainer

SEQ, STEPS = 64, 3
# run -> (parallel settings, --num-workers); under DP=4 every rank reads its own samples
RUNS = {"dp4": ({}, 0), "tp2": ({"tensor_model_parallel_size": 2}, 0),
        "tp2_workers": ({"tensor_model_parallel_size": 2}, 1),
        "pp4": ({"pipeline_model_parallel_size": 4}, 0)}


class CountingDataset(torch.utils.data.Dataset):
    """Packed documents (several per sample, so ``doc_starts`` matter) from two "sources"
    (``source``: sample parity), each read appended to ``log`` (works in forked workers)."""

    names = ["even", "odd"]

    def __init__(self, inner, log: str):
        self.inner, self.log = inner, log

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{int(i)}\n")
        return {**self.inner[int(i)], "source": torch.tensor(int(i) % 2)}


def config(parallel: dict, num_workers: int) -> RunConfig:
    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]
    cfg.data.num_workers = num_workers
    cfg.data.reset_attention_mask = cfg.data.reset_position_ids = cfg.data.eod_mask_loss = True
    m, t = cfg.model, cfg.training
    m.make_vocab_size_divisible_by = 1  # the same padded vocabulary at TP 1 and 2
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 4, 64, 128  # a layer per stage at PP=4
    m.num_attention_heads, m.num_query_groups = 4, 2
    t.seq_length, t.micro_batch_size, t.global_batch_size = SEQ, 2, 8
    t.train_iters, t.eval_iters, t.lr, t.min_lr, t.lr_warmup_iters = STEPS, 2, 3e-3, 1e-4, 1
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def read_log(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f]


def main(out: str) -> None:
    init_process_group()
    rank = dist.get_rank()
    options = SampleOptions(SEQ, eod=ByteTokenizer.eod, reset_position_ids=True,
                            eod_mask_loss=True)
    # short documents (3-40 tokens), several per sample, so document attention matters
    stream = stdlib_token_stream(max_docs=5)
    stream[np.random.default_rng(0).random(len(stream)) < 0.05] = ByteTokenizer.eod
    inner = TokenStreamDataset(stream, SEQ, options)
    state, results = None, {}
    for name, (parallel, workers) in RUNS.items():
        cfg = config(parallel, workers)
        cfg.validate(dist.get_world_size())
        initialize_model_parallel(cfg.parallel, cfg.training.seed)
        logs = {split: os.path.join(out, f"{name}_{split}_rank{rank}.txt")
                for split in ("train", "valid")}
        trainer = Trainer(cfg, CountingDataset(inner, logs["train"]), init_state_dict=state,
                          valid_dataset=CountingDataset(inner, logs["valid"]))
        if state is None:  # the first run's initial weights serve every run
            state = {n: t.clone() for n, t in full_tensors(trainer.model).items()}
        steps = [trainer.train_step() for _ in range(STEPS)]
        evaluation = trainer.evaluate()
        if trainer.loader is not None:
            trainer.loader.close()
        dist.barrier()
        results[name] = {"steps": steps, "eval": evaluation,
                         "reads": {s: read_log(p) for s, p in logs.items()},
                         "loader": trainer.loader is not None}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
