#!/usr/bin/env python
"""One forward + backward of a tiny Llama at 16k-128k tokens: chunked vs full-logits loss vs
transformers, peak memory and time side by side.

Tiny Llama: 2 layers, hidden 256, 8 heads / 2 KV groups, FFN 688, fp32, one sequence, with a
32000 (Llama-2) and a 128256 (Llama-3) vocabulary. Per configuration, in a fresh process:

* ours, chunked: ``--cross-entropy-chunk-size`` automatic (chunks of <= 256 MiB fp32 logits);
* ours, full logits: ``--cross-entropy-chunk-size 0`` (megatron-core's output layer and
  vocab-parallel cross entropy);
* transformers: ``LlamaForCausalLM`` (``attn_implementation="sdpa"``) on the same weights,
  ``loss.backward()``.

Peak: the process's peak RSS (``ru_maxrss``) minus its RSS once the model and the sample are
built (the model's weights are in the baseline; gradients, activations and logits are not).
Time: one forward + backward, no warm-up. A configuration whose estimated peak exceeds
``--limit-gib`` (20) is skipped and listed as such: ours by the project's memory estimator,
transformers by ``12 x tokens x vocabulary`` bytes (fp32 logits, their log-softmax and both
gradients). Results accumulate in ``benchmarks/results/long_sequence.json`` across
invocations (one per group of lengths keeps each run under ~10 minutes on 2 cores); the
markdown table is rebuilt from all of them.

    python benchmarks/long_sequence.py --lengths 16384 32768 65536
    python benchmarks/long_sequence.py --lengths 131072
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LENGTHS = (16384, 32768, 65536, 131072)
VOCABS = (32000, 128256)
IMPLS = ("ours, chunked", "ours, full logits", "transformers")
GOAL_GIB = 12.0  # issue 15: 131072 tokens x 128256 vocabulary, chunked, under 12 GiB RSS
RESULTS = os.path.join(ROOT, "benchmarks", "results", "long_sequence")


def run_config(seq: int, vocab: int, impl: str):
    from megatron_longctx.config import RunConfig

    cfg = RunConfig()
    m, t = cfg.model, cfg.training
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 2, 256, 688
    m.num_attention_heads, m.num_query_groups, m.vocab_size = 8, 2, vocab
    m.max_position_embeddings = seq
    t.seq_length, t.micro_batch_size, t.global_batch_size, t.train_iters = seq, 1, 1, 1
    t.cross_entropy_chunk_size = 0 if impl == "ours, full logits" else None
    t.check_for_nan_in_loss_and_grad = False  # no training step here
    return cfg


def estimated_gib(seq: int, vocab: int, impl: str) -> float:
    """Peak above the built model: ours from the project's estimator (weights and optimizer
    left out), transformers from its fp32 logits alone."""
    from megatron_longctx.training.memory import GIB, stage_memory

    if impl == "transformers":
        return 12 * seq * vocab / GIB
    estimate = stage_memory(run_config(seq, vocab, impl), 1, 0)
    return (estimate.total - estimate["weights"] - estimate["optimizer"]) / GIB


def worker(seq: int, vocab: int, impl: str) -> dict:
    import psutil
    import torch

    from megatron_longctx.model import build_model
    from megatron_longctx.parallel.initialize import (
        init_process_group,
        initialize_model_parallel,
    )

    cfg = run_config(seq, vocab, impl)
    init_process_group()
    initialize_model_parallel(cfg.parallel, cfg.training.seed)
    model = build_model(cfg.model, cfg.parallel, training=cfg.training)
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (1, seq + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if impl == "transformers":
        from transformers import LlamaForCausalLM

        from megatron_longctx.convert.hf_config import hf_config
        from megatron_longctx.model.hf_conversion import to_hf
        from megatron_longctx.model.sharding import full_tensors

        state = to_hf(full_tensors(model), cfg.model)
        del model
        model = LlamaForCausalLM._from_config(hf_config(cfg.model), attn_implementation="sdpa")
        model.load_state_dict(state)
        del state
        model.train()

        def step() -> float:
            # already shifted labels: every one of the seq positions is scored, as in ours
            loss = model(input_ids=inputs, labels=labels, shift_labels=labels).loss
            loss.backward()
            return float(loss)
    else:
        positions = torch.arange(seq)[None]

        def step() -> float:
            losses = model(inputs, positions, None, labels=labels)  # [b, s]
            loss = losses.mean()
            loss.backward()
            return float(loss)
    import gc

    gc.collect()
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_gib": (peak - baseline) / 2**30, "peak_rss_gib": peak / 2**30,
            "seconds": seconds, "loss": loss}


def measure(seq: int, vocab: int, impl: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(seq), str(vocab), impl],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict) -> list[list]:
    rows = []
    for seq in LENGTHS:
        for vocab in VOCABS:
            for impl in IMPLS:
                r = results.get(f"{seq} {vocab} {impl}")
                if r is None:
                    continue
                if "skipped" in r:
                    rows.append([seq, vocab, impl, f"skipped (est. {r['skipped']:.1f} GiB)",
                                 "", "", ""])
                elif "error" in r:
                    rows.append([seq, vocab, impl, f"failed: {r['error']}", "", "", ""])
                else:
                    goal = ""
                    if (seq, vocab, impl) == (131072, 128256, "ours, chunked"):
                        met = r["peak_rss_gib"] < GOAL_GIB
                        goal = f" (goal < {GOAL_GIB:g}: {'met' if met else 'NOT met'})"
                    rows.append([seq, vocab, impl, f"{r['peak_gib']:.2f}",
                                 f"{r['peak_rss_gib']:.2f}{goal}", f"{r['seconds']:.1f}",
                                 f"{r['loss']:.4f}"])
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        seq, vocab, impl = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        print(json.dumps(worker(seq, vocab, impl)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--limit-gib", type=float, default=20.0)
    args = parser.parse_args()
    from benchmarks.common import machine, write_markdown

    results = {}
    if os.path.exists(RESULTS + ".json"):
        with open(RESULTS + ".json") as f:
            results = json.load(f)
    for seq in args.lengths:
        for vocab in args.vocabs:
            for impl in IMPLS:
                estimate = estimated_gib(seq, vocab, impl)
                if estimate > args.limit_gib:
                    result = {"skipped": estimate}
                else:
                    result = {**measure(seq, vocab, impl), "estimate_gib": estimate}
                results[f"{seq} {vocab} {impl}"] = {**result, "machine": machine()}
                print(seq, vocab, impl, result, flush=True)
                with open(RESULTS + ".json", "w") as f:
                    json.dump(results, f, indent=1)
    notes = (
        "Tiny Llama (2 layers, hidden 256, 8 heads / 2 KV groups, FFN 688), fp32, one "
        "sequence, one forward + backward (no optimizer), each in a fresh process using both "
        "cores. peak GiB: peak RSS (`ru_maxrss`) minus RSS with the model and sample built; "
        "peak RSS GiB: the whole process (imports and weights included; the issue's goal is "
        "on this). Time: one forward + backward without warm-up, on 2 cores shared with other "
        "work (noisy). Loss: the mean token loss (the same weights and tokens on every row of "
        "a length and vocabulary; transformers' equals ours). ours, chunked: "
        "`--cross-entropy-chunk-size` automatic; ours, full logits: 0 (megatron-core's output "
        "layer and cross entropy); transformers: `LlamaForCausalLM` (sdpa) on the same "
        f"weights. Skipped: estimated peak above {args.limit_gib:g} GiB (ours: "
        "`training.memory.stage_memory`; transformers: 12 B x tokens x vocabulary for fp32 "
        "logits, log-softmax and their gradients). Rows may come from separate invocations "
        "(`--lengths`), each with its machine line in `long_sequence.json`. Command: "
        "`python benchmarks/long_sequence.py --lengths 16384 32768 65536` then "
        "`--lengths 131072`.")
    print(write_markdown(RESULTS + ".md", "Long sequences: one forward + backward, chunked vs "
                         "full-logits loss vs transformers",
                         ["tokens", "vocab", "implementation", "peak GiB", "peak RSS GiB",
                          "seconds", "loss"], table(results), notes))


if __name__ == "__main__":
    main()
