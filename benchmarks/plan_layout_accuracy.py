#!/usr/bin/env python
"""The memory estimator against measured peaks: 2-process training runs on CPU.

Each configuration trains ``STEPS`` iterations (megatron-core DDP, optimizer, pipeline schedule)
under ``torchrun --nproc_per_node 2`` with gloo. Measured per rank: peak RSS of the process
(``ru_maxrss``) minus its RSS after setup (imports, process groups, megatron-core groups and the
dataset; before the model is built), i.e. everything the model, its gradients, the optimizer and
the steps allocate. Estimated: ``megatron_longctx.training.memory.stage_memory`` for the rank's
pipeline stage. Goal (issue 15): within 15% for at least five configurations that need
>= 1.5 GiB per rank, covering TP, PP, CP, recompute and the distributed optimizer.

    python benchmarks/plan_layout_accuracy.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS = 2  # the second step runs with the optimizer states of the first
GOAL = 0.15
# glibc keeps freed heap blocks and the retained heap grows step after step (see the notes);
# a fixed mmap threshold returns freed tensors to the OS, so RSS follows the live tensors,
# which is what the estimator counts
MMAP_THRESHOLD = 1 << 20
MODEL = {"num_layers": 8, "hidden_size": 1024, "ffn_hidden_size": 2816,
         "num_attention_heads": 16, "num_query_groups": 4, "vocab_size": 32000,
         "max_position_embeddings": 16384}
CONFIGS = {
    "TP=2 SP fp32": {
        "parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        "training": {"seq_length": 2048}},
    "PP=2 fp32 full recompute": {
        "parallel": {"pipeline_model_parallel_size": 2},
        "training": {"seq_length": 2048, "global_batch_size": 4,
                     "recompute_granularity": "full"}},
    "CP=2 bf16 selective + distributed optimizer": {
        "parallel": {"context_parallel_size": 2, "use_distributed_optimizer": True},
        "training": {"seq_length": 8192, "bf16": True, "recompute_granularity": "selective"}},
    "DP=2 fp32 distributed optimizer": {
        "parallel": {"use_distributed_optimizer": True},
        "training": {"seq_length": 2048, "global_batch_size": 2}},
    "TP=2 bf16 full recompute, 128k vocab chunked": {
        "model": {"vocab_size": 128256},
        "parallel": {"tensor_model_parallel_size": 2},
        "training": {"seq_length": 8192, "bf16": True, "recompute_granularity": "full"}},
    "CP=2 fp32 packed documents": {
        "parallel": {"context_parallel_size": 2},
        "training": {"seq_length": 4096},
        "data": {"reset_attention_mask": True}},
}


def build_config(name: str):
    from megatron_longctx.config import RunConfig

    spec = CONFIGS[name]
    raw = {"model": {**MODEL, **spec.get("model", {})},
           "parallel": spec.get("parallel", {}),
           "training": {"micro_batch_size": 1, "global_batch_size": 1, "train_iters": STEPS,
                        "lr": 1e-4, **spec.get("training", {})},
           "data": {"data_path": ["stdlib"], **spec.get("data", {})}}
    return RunConfig.from_dict(raw)


def worker(name: str, out: str) -> None:
    import numpy as np
    import psutil
    import torch.distributed as dist

    from megatron_longctx.data.samples.long_context_dataset import SampleOptions
    from megatron_longctx.data.samples.token_dataset import TokenStreamDataset
    from megatron_longctx.parallel.initialize import (
        init_process_group,
        initialize_model_parallel,
    )
    from megatron_longctx.training.trainer import Trainer

    cfg = build_config(name)
    t = cfg.training
    env = init_process_group()
    cfg.validate(env.world_size)
    initialize_model_parallel(cfg.parallel, t.seed)
    rng = np.random.default_rng(0)
    eod = cfg.model.vocab_size - 1
    tokens = rng.integers(0, eod, size=t.seq_length * 8 + 1).astype(np.int32)
    tokens[rng.integers(0, len(tokens), size=len(tokens) // 1500)] = eod  # documents
    options = SampleOptions(t.seq_length, eod=eod,
                            reset_position_ids=cfg.data.reset_attention_mask)
    dataset = TokenStreamDataset(tokens, t.seq_length, options)
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    trainer = Trainer(cfg, dataset)
    for _ in range(STEPS):
        trainer.train_step()
    from megatron.core import parallel_state

    result = {"baseline": baseline,
              "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "stage": parallel_state.get_pipeline_model_parallel_rank(),
              "seconds": time.perf_counter() - start}
    with open(f"{out}.rank{dist.get_rank()}", "w") as f:
        json.dump(result, f)


def launch(name: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29731", __file__, "--worker", name, out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
               "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
        return [json.load(open(f"{out}.rank{r}")) for r in range(2)]


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "plan_layout_accuracy.md"))
    args = parser.parse_args()
    from benchmarks.common import write_markdown
    from megatron_longctx.training.memory import GIB, stage_memory

    rows, within = [], 0
    for name in args.only or CONFIGS:
        cfg = build_config(name)
        ranks = launch(name)
        errors = []
        for rank, r in enumerate(ranks):
            measured = r["peak"] - r["baseline"]
            estimate = stage_memory(cfg, 2, r["stage"])
            errors.append((estimate.total - measured) / measured)
            rows.append([name, rank, f"{measured / GIB:.2f}", f"{estimate.total / GIB:.2f}",
                         f"{errors[-1]:+.1%}",
                         " ".join(f"{t.name[:5]} {t.bytes / GIB:.2f}" for t in estimate.terms),
                         estimate.peak_phase.name,
                         f"{r['seconds']:.0f}"])
            print(rows[-1], flush=True)
        big = min(r["peak"] - r["baseline"] for r in ranks) >= 1.5 * GIB
        within += big and max(abs(e) for e in errors) <= GOAL
    notes = (
        f"{within} of {len(args.only or CONFIGS)} configurations are within "
        f"{GOAL:.0%} on every rank with >= 1.5 GiB measured per rank (goal: at least 5). "
        f"Model: Llama-style, {MODEL['num_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"FFN {MODEL['ffn_hidden_size']}, {MODEL['num_attention_heads']} heads / "
        f"{MODEL['num_query_groups']} KV groups, vocabulary {MODEL['vocab_size']} unless "
        f"stated; micro-batch 1, Adam, {STEPS} training steps, 2 processes (torchrun, gloo, 1 "
        f"thread each). measured: peak RSS (`ru_maxrss`) minus RSS after setup (imports, "
        f"process groups, dataset; before the model is built), with "
        f"`MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}` so that glibc returns freed tensors to the "
        f"OS and RSS follows the live tensors (with its defaults the retained heap grows step "
        f"after step: a single-process run of the DP config's model had 2.5, 3.9, 4.2 GiB "
        f"after steps 1-3 and peaked at 4.8 GiB; with the threshold 2.4 GiB after every step, "
        f"4.25 GiB peak). estimate: "
        f"`megatron_longctx.training.memory.stage_memory` for the rank's pipeline stage "
        f"(terms in GiB: weights, gradients, optimizer, activations, logits; the total is "
        f"weights + gradients + optimizer + the largest of the step's peak candidates, named "
        f"in 'peak at'). "
        f"Command: `python benchmarks/plan_layout_accuracy.py`.")
    print(write_markdown(args.out, "Memory estimator vs measured peak (2 ranks, CPU)",
                         ["configuration", "rank", "measured GiB", "estimate GiB", "error",
                          "estimate terms (GiB)", "peak at", "run s"], rows, notes))


if __name__ == "__main__":
    main()
