#!/usr/bin/env python
"""Context parallelism: peak activation memory per rank and step time, CP=1 vs CP=2.

A tiny Llama (2 layers, hidden 128, 4 heads, GQA 2) trains one micro-batch per step at
sequence 16k and 32k: CP=1 in one process, CP=2 in two processes (torchrun, gloo on CPU). Peak
activation memory is the highest resident set size sampled during the timed steps minus the
resident size just before them (model, optimizer and data already allocated).

    python benchmarks/context_parallel.py [--seqs 16384 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(seq: int, cp: int, out: str, steps: int) -> None:
    import psutil
    import torch.distributed as dist

    from benchmarks.common import PeakRSS
    from megatron_longctx.config import RunConfig
    from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
    from megatron_longctx.parallel.initialize import (
        init_process_group,
        initialize_model_parallel,
    )
    from megatron_longctx.training.trainer import Trainer

    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]
    m, t = cfg.model, cfg.training
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 2, 128, 352
    m.num_attention_heads, m.num_query_groups = 4, 2
    t.seq_length, t.micro_batch_size, t.global_batch_size, t.train_iters = seq, 1, 1, steps + 1
    cfg.parallel.context_parallel_size = cp
    env = init_process_group()
    cfg.validate(env.world_size)
    initialize_model_parallel(cfg.parallel, t.seed)
    trainer = Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=400), seq))
    trainer.train_step()  # warm-up: allocator and optimizer state settle
    baseline = psutil.Process().memory_info().rss
    peak = PeakRSS(os.getpid(), interval=0.002)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    elapsed = (time.perf_counter() - start) / steps
    activation = (peak.stop() - baseline) / 2**20
    with open(f"{out}.rank{dist.get_rank()}", "w") as f:
        json.dump({"step_s": elapsed, "activation_mib": activation}, f)


def launch(seq: int, cp: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cp),
               "--master_port", str(29700 + cp), __file__, "--worker", str(seq), str(cp), out,
               str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // cp)), "PYTHONPATH": ROOT}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        ranks = [json.load(open(f"{out}.rank{r}")) for r in range(cp)]
    return {"step_s": max(r["step_s"] for r in ranks),
            "activation_mib": max(r["activation_mib"] for r in ranks)}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        seq, cp, out, steps = sys.argv[2:6]
        worker(int(seq), int(cp), out, int(steps))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "context_parallel.md"))
    args = parser.parse_args()
    from benchmarks.common import write_markdown

    rows = []
    for seq in args.seqs:
        one, two = launch(seq, 1, args.steps), launch(seq, 2, args.steps)
        rows.append([seq, f"{one['activation_mib']:.0f}", f"{two['activation_mib']:.0f}",
                     f"{two['activation_mib'] / one['activation_mib']:.2f}",
                     f"{one['step_s']:.2f}", f"{two['step_s']:.2f}",
                     f"{one['step_s'] / two['step_s']:.2f}x"])
        print(rows[-1], flush=True)
    text = write_markdown(
        args.out, "Context parallelism: CP=1 (1 process) vs CP=2 (2 processes)",
        ["seq", "CP=1 peak act. MiB/rank", "CP=2 peak act. MiB/rank",
         "memory ratio CP2/CP1 (goal <= 0.6)", "CP=1 s/step", "CP=2 s/step",
         "speed-up"], rows,
        "Tiny Llama (2 layers, hidden 128, 4 heads / 2 KV groups), micro-batch 1, fp32, gloo on "
        "CPU; both layouts use the same 2 cores (CP=1: 2 threads, CP=2: 1 thread per rank). "
        "Peak activation memory = max RSS during the timed steps minus RSS before them. "
        "Command: `python benchmarks/context_parallel.py`.")
    print(text)


if __name__ == "__main__":
    main()
