#!/usr/bin/env python
"""One training step, ours vs transformers: tokens/s, peak memory and MFU side by side.

The same tiny Llama (4 layers, hidden 256, 8 heads / 2 KV groups, FFN 688, vocabulary 32000),
the same initial weights (drawn by our model, copied with ``hf_conversion.to_hf``) and the same
samples (our ``GlobalBatchSampler``), micro-batch 1, at each sequence length and precision:

* ours: ``Trainer.train_step()`` (megatron-core DDP + optimizer, fp32 master weights in bf16);
* transformers: ``LlamaForCausalLM`` (``attn_implementation="sdpa"``), ``torch.optim.AdamW``
  and gradient clipping, bf16 through ``torch.autocast`` (what its ``Trainer(bf16=True)`` does).

Every configuration runs in its own process, so peak resident memory (``ru_maxrss``) is its
own. MFU divides ``training.flops.num_floating_point_operations`` per second by the matmul
peak of the same dtype measured at the start of the run.

    python benchmarks/train_step.py [--seqs 4096 16384] [--dtypes fp32 bf16] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMPLS = ("ours", "transformers")


def run_config(seq: int, bf16: bool, steps: int):
    from megatron_longctx.config import RunConfig

    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]
    m, t = cfg.model, cfg.training
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 4, 256, 688
    m.num_attention_heads, m.num_query_groups, m.vocab_size = 8, 2, 32000
    m.max_position_embeddings = seq
    t.seq_length, t.micro_batch_size, t.global_batch_size = seq, 1, 1
    t.train_iters, t.bf16, t.lr = steps + 1, bf16, 3e-4
    t.min_lr = 0.0
    return cfg


def worker(impl: str, seq: int, dtype: str, steps: int, out: str) -> None:
    from benchmarks.common import best_of
    from megatron_longctx.convert.hf_config import hf_config
    from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
    from megatron_longctx.model import build_model
    from megatron_longctx.model.hf_conversion import to_hf
    from megatron_longctx.model.sharding import full_tensors
    from megatron_longctx.parallel.initialize import (
        init_process_group,
        initialize_model_parallel,
    )
    from megatron_longctx.training.batches import GlobalBatchSampler, collate
    from megatron_longctx.training.trainer import Trainer

    cfg = run_config(seq, dtype == "bf16", steps)
    t = cfg.training
    init_process_group()
    cfg.validate(1)
    initialize_model_parallel(cfg.parallel, t.seed)
    dataset = TokenStreamDataset(stdlib_token_stream(max_docs=60), seq)
    # both sides start from the weights our model draws in fp32 (same setup, same imports)
    state = full_tensors(build_model(cfg.model, cfg.parallel))

    if impl == "ours":
        trainer = Trainer(cfg, dataset, init_state_dict=state)

        def step() -> float:
            metrics = trainer.train_step()
            return metrics.get("lm_loss", metrics.get("loss"))
    else:
        from transformers import LlamaForCausalLM

        from benchmarks.common import hf_train_step

        model = LlamaForCausalLM._from_config(hf_config(cfg.model), attn_implementation="sdpa")
        assert model.config._attn_implementation == "sdpa"
        model.load_state_dict(to_hf(state, cfg.model))
        model.train()
        sampler = GlobalBatchSampler(len(dataset), t.global_batch_size, t.micro_batch_size,
                                     dp_rank=0, dp_size=1, seed=t.seed, shuffle=True)
        counter = iter(range(10**9))
        step = hf_train_step(
            model, t, lambda: collate(dataset, sampler.micro_batches(next(counter))[0]))
    del state

    losses = []
    step_s = best_of(lambda: losses.append(step()), repeats=steps, warmup=1)
    with open(out, "w") as f:
        json.dump({"step_s": step_s, "first_loss": losses[0],
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
                  f)


def launch(impl: str, seq: int, dtype: str, steps: int, timeout: float) -> dict:
    from benchmarks.common import launch_worker

    return launch_worker(__file__, [impl, str(seq), dtype, str(steps)], timeout,
                         env={"OMP_NUM_THREADS": "2"})


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        impl, seq, dtype, steps, out = sys.argv[2:7]
        worker(impl, int(seq), dtype, int(steps), out)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=1, help="timed steps (best of), after one "
                                                              "warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "train_step.md"))
    args = parser.parse_args()
    import torch

    from benchmarks.common import goal, write_markdown
    from megatron_longctx.training.flops import (
        measure_matmul_peak_tflops,
        num_floating_point_operations,
    )

    torch.set_num_threads(2)
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    load_before = os.getloadavg()[0]
    # the cores are shared, so a reading can come out low: the matmul peak is read before
    # and after every configuration, and the best reading is the MFU denominator
    readings: dict[str, list[float]] = {d: [] for d in args.dtypes}

    def read_peaks() -> None:
        for d in args.dtypes:
            readings[d].append(measure_matmul_peak_tflops(torch_dtypes[d], seconds=1.0))

    read_peaks()
    results: dict[tuple, dict] = {}
    for seq in args.seqs:
        for dtype in args.dtypes:
            # rounds alternate the implementations, so load from other users of the cores
            # hits both alike; the fastest step and the highest peak memory are kept
            for _ in range(args.rounds):
                for impl in IMPLS:
                    r = launch(impl, seq, dtype, args.steps, args.timeout)
                    r["load"] = os.getloadavg()[0]
                    read_peaks()
                    print(seq, dtype, impl, r, flush=True)
                    kept = results.setdefault((seq, dtype, impl), r)
                    if "error" in kept or "error" in r:
                        results[seq, dtype, impl] = r if "error" in r else kept
                    elif r["step_s"] < kept["step_s"]:
                        r["peak_rss_gib"] = max(kept["peak_rss_gib"], r["peak_rss_gib"])
                        results[seq, dtype, impl] = r
                    else:
                        kept["peak_rss_gib"] = max(kept["peak_rss_gib"], r["peak_rss_gib"])
    peaks = {d: max(readings[d]) for d in args.dtypes}

    rows = []
    for seq in args.seqs:
        flops = num_floating_point_operations(run_config(seq, False, 1).model, seq, 1)
        for dtype in args.dtypes:
            for impl in IMPLS:
                r = results[seq, dtype, impl]
                if "error" in r:
                    rows.append([seq, dtype, impl, r["error"], "", "", "", ""])
                    continue
                r["tokens_s"] = seq / r["step_s"]
                r["mfu"] = flops / r["step_s"] / (peaks[dtype] * 1e12)
                rows.append([seq, dtype, impl, f"{r['tokens_s']:.0f}",
                             f"{r['peak_rss_gib']:.2f}", f"{100 * r['mfu']:.1f}%",
                             f"{r['first_loss']:.4f}", f"{r['load']:.1f}"])
            ours, hf = results[seq, dtype, "ours"], results[seq, dtype, "transformers"]
            if "error" not in ours and "error" not in hf:
                rows.append([seq, dtype, "ours / transformers",
                             goal(ours["tokens_s"] / hf["tokens_s"], 1.25, True),
                             goal(ours["peak_rss_gib"] / hf["peak_rss_gib"], 0.6, False),
                             f"{ours['mfu'] / hf['mfu']:.2f}", "", ""])
        fp32, bf16 = results.get((seq, "fp32", "ours"), {}), results.get((seq, "bf16", "ours"), {})
        if "tokens_s" in fp32 and "tokens_s" in bf16:
            rows.append([seq, "bf16 / fp32", "ours",
                         goal(bf16["tokens_s"] / fp32["tokens_s"], 1.5, True),
                         f"{bf16['peak_rss_gib'] / fp32['peak_rss_gib']:.2f}", "", "", ""])
    if "fp32" in peaks and "bf16" in peaks:
        rows.append(["-", "bf16 / fp32", "matmul peak",
                     f"{peaks['bf16'] / peaks['fp32']:.2f} ({peaks['bf16']:.2f} / "
                     f"{peaks['fp32']:.2f} TFLOP/s)", "", "", "", ""])
    load_after = os.getloadavg()[0]
    text = write_markdown(
        args.out, "Training step: ours vs transformers (LlamaForCausalLM, sdpa)",
        ["seq", "dtype", "implementation", "tokens/s", "peak RSS GiB", "MFU", "loss step 1",
         "load"],
        rows,
        "Tiny Llama (4 layers, hidden 256, 8 heads / 2 KV groups, FFN 688, vocabulary 32000), "
        "micro-batch 1, forward + backward + AdamW step (gradient clipping 1.0), 2 threads. "
        f"Tokens/s: the fastest of {args.steps} steps after one warm-up, over {args.rounds} "
        "runs per configuration alternating ours and transformers; peak RSS: the highest of "
        "those runs, each configuration in its own process (`ru_maxrss`, imports and setup "
        "included). Same initial weights and samples on both sides (equal step-1 losses show "
        "it). Ours: `Trainer.train_step()` (megatron-core DDP and optimizer; bf16 = bf16 "
        "weights, fp32 master weights and fp32 gradient buffers). transformers: "
        "`LlamaForCausalLM(attn_implementation='sdpa')` + `torch.optim.AdamW`; bf16 = "
        "`torch.autocast` over fp32 weights (its Trainer's bf16). "
        "MFU: `megatron_longctx.training.flops.num_floating_point_operations` (Megatron-LM's "
        f"formula, causal attention halved: {flops_summary(run_config, args.seqs)}) per second "
        "over the matmul peak of the same dtype measured in this run "
        "(`measure_matmul_peak_tflops`, 2048x2048, the best of readings before and after every "
        f"configuration: {_readings(readings)}). The 2 cores are shared with other work: "
        "`load` is the 1-minute load average after the run kept (1-2 is this benchmark alone; "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end), so timings are noisy. "
        "Command: `python benchmarks/train_step.py`.")
    print(text)


def _readings(readings: dict[str, list[float]]) -> str:
    return ", ".join(f"{d} {min(r):.2f} to {max(r):.2f} TFLOP/s" for d, r in readings.items())


def flops_summary(make_config, seqs: list[int]) -> str:
    from megatron_longctx.training.flops import num_floating_point_operations

    return ", ".join(
        f"{num_floating_point_operations(make_config(s, False, 1).model, s, 1) / 1e12:.2f} "
        f"TFLOP/step at {s}" for s in seqs)


if __name__ == "__main__":
    main()
