#!/usr/bin/env python
"""A LongRecipe training step vs a full-length step and a plain short step, side by side.

The same tiny Llama (4 layers, hidden 256, 8 heads / 2 KV groups, FFN 688, vocabulary 32000,
fp32, micro-batch 1) and the same byte-tokenized stdlib documents; ``Trainer.train_step()``
including sample building:

* ``longrecipe``: ``--seq-length`` L_train = 0.3 L', single-document windows whose LongRecipe
  position ids span L' (``data.samples.document_windows`` with ``--position-transform longrecipe``);
* ``full``: plain samples of L' tokens;
* ``plain``: plain samples of L_train tokens (no transform): the transform's overhead.

Every configuration runs in its own process (peak RSS: ``ru_maxrss``); step time is the best of
``--steps`` after one warm-up step; rounds alternate the configurations so that load from other
users of the cores hits all alike.

    python benchmarks/longrecipe_step.py [--target 8192] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = ("longrecipe", "full", "plain")
TIME_GOAL_FULL, TIME_GOAL_PLAIN = 0.35, 1.05


def _dataset(kind: str, seq: int, target: int, tmp: str):
    import numpy as np

    from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents
    from megatron_longctx.data.formats.indexed_writer import IndexedDatasetWriter
    from megatron_longctx.data.samples.document_windows import DocumentWindows
    from megatron_longctx.data.samples.long_context_dataset import SampleOptions, open_indexed
    from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
    from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
    from megatron_longctx.methods.position_transform import PositionTransform, sentence_end_table

    if kind != "longrecipe":
        return TokenStreamDataset(stdlib_token_stream(max_docs=200), seq)
    prefix = os.path.join(tmp, "stdlib_text_document")
    tok = ByteTokenizer()
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for text in stdlib_documents(max_docs=200):
            writer.add_document(tok.tokenize(text) + [tok.eod])
        writer.finalize()
    indexed = open_indexed(prefix)
    transform = PositionTransform("longrecipe", target, seed=1,
                                  sentence_ends=sentence_end_table(tok))
    options = SampleOptions(seq, eod=tok.eod, position_transform=transform)
    return DocumentWindows("stdlib", indexed, np.arange(len(indexed.sequence_lengths)), 1000,
                           options)


def worker(kind: str, target: int, steps: int, out: str) -> None:
    import time

    from benchmarks.train_step import run_config
    from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
    from megatron_longctx.training.trainer import Trainer

    seq = target if kind == "full" else int(0.3 * target)
    cfg = run_config(seq, bf16=False, steps=steps)  # train_step.py's model, fp32
    cfg.model.max_position_embeddings = target
    t = cfg.training
    init_process_group()
    cfg.validate(1)
    initialize_model_parallel(cfg.parallel, t.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, _dataset(kind, seq, target, tmp))
        max_position = int(trainer.dataset[0]["position_ids"].max())
        trainer.train_step()  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
    with open(out, "w") as f:
        json.dump({"seq": seq, "step_s": min(times), "tokens_per_s": seq / min(times),
                   "max_position": max_position,
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
                  f)


def launch(kind: str, target: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ROOT}
        subprocess.run([sys.executable, __file__, "--worker", kind, str(target), str(steps),
                        out], env=env, check=True, capture_output=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        kind, target, steps, out = sys.argv[2:6]
        worker(kind, int(target), int(steps), out)
        return
    p = argparse.ArgumentParser()
    p.add_argument("--target", type=int, default=8192, help="L'")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "longrecipe_step.md"))
    args = p.parse_args()
    from benchmarks.common import write_markdown

    load_before = os.getloadavg()[0]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for kind in CONFIGS:
            r = launch(kind, args.target, args.steps)
            print(kind, r, flush=True)
            kept = best.setdefault(kind, r)
            if r["step_s"] < kept["step_s"]:
                r["peak_rss_gib"] = max(r["peak_rss_gib"], kept["peak_rss_gib"])
                best[kind] = r
    lr, full, plain = (best[k] for k in CONFIGS)
    vs_full, vs_plain = lr["step_s"] / full["step_s"], lr["step_s"] / plain["step_s"]
    rows = [[kind, r["seq"], r["max_position"], f"{r['step_s']:.2f}",
             f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_gib']:.2f}"]
            for kind, r in best.items()]
    verdict = (f"LongRecipe step time / full-length step: {vs_full:.3f} (goal <= "
               f"{TIME_GOAL_FULL}: {'met' if vs_full <= TIME_GOAL_FULL else 'NOT met'}); / plain "
               f"step at L_train: {vs_plain:.3f} (goal <= {TIME_GOAL_PLAIN}: "
               f"{'met' if vs_plain <= TIME_GOAL_PLAIN else 'NOT met'}); peak memory / full: "
               f"{lr['peak_rss_gib'] / full['peak_rss_gib']:.2f}.")
    notes = (f"{verdict}\n\nL' = {args.target}, L_train = 0.3 L'. Model: Llama-style, 4 "
             f"layers, hidden 256, 8 heads / 2 KV groups, FFN 688, vocabulary 32000, fp32, "
             f"micro-batch 1, Adam. Step: `Trainer.train_step()` including sample building "
             f"(LongRecipe positions computed per sample), best of {args.steps} after one "
             f"warm-up, best of {args.rounds} rounds alternating the configurations; peak: "
             f"`ru_maxrss` of the configuration's own process. 2 shared cores: 1-minute load "
             f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Command: "
             f"`python benchmarks/longrecipe_step.py`.")
    print(write_markdown(args.out, "LongRecipe step vs full-length and plain steps",
                         ["configuration", "tokens", "largest position", "step s", "tokens/s",
                          "peak RSS GiB"], rows, notes))


if __name__ == "__main__":
    main()
