#!/usr/bin/env python
"""Preprocessing throughput against the bare tokenizer, and peak memory at N and 2N.

* Corpus: Python's stdlib sources repeated into a >= ``--mb`` MB JSONL file (and one twice as
  large), cached in ``--workdir`` with the SentencePiece BPE model trained on one pass of it.
* Pipeline: ``tools/preprocess_data.py --workers W --append-eod`` in a subprocess; wall time
  from launch to exit (interpreter start, tokenizer load, reading, JSON parsing, writing and
  the index all included). Tokens exclude the appended EODs so both sides count the same ids.
* Bare tokenizer: the same texts already in memory, encoded by SentencePiece's batch
  ``encode`` (``num_threads=1``) in a pool of W processes that inherit the texts (nothing
  shipped to them): the ceiling for W tokenizing processes. Both the list-of-ints and the numpy
  return type are timed; the ratio is against the faster.
* Memory: peak of the summed RSS of the preprocessing process and its workers (sampled every
  20 ms) at N and 2N.

    python benchmarks/preprocess.py [--mb 100] [--workers 2] [--workdir /tmp/megatron_longctx_bench]
"""

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PeakRSS, write_markdown  # noqa: E402
from megatron_longctx.data.corpora.stdlib_corpus import write_stdlib_jsonl  # noqa: E402
from megatron_longctx.data.formats.indexed_reader import check_indexed_dataset  # noqa: E402
from megatron_longctx.data.preprocessing.jsonl_reader import DocumentReader  # noqa: E402
from megatron_longctx.data.tokenization.sentencepiece_trainer import (  # noqa: E402
    SentencePieceTrainConfig,
    train_sentencepiece,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_BYTES = 1 << 20  # texts per encode call in the baseline, as the pipeline's chunks

_texts: list[str] = []  # baseline corpus, inherited by the forked pool
_sp = None


def corpus(workdir: str, repeat: int) -> str:
    path = os.path.join(workdir, f"stdlib_x{repeat}.jsonl")
    if not os.path.exists(path):
        write_stdlib_jsonl(path, repeat=repeat)
    return path


def sp_model(workdir: str, one_pass: str, vocab: int) -> str:
    prefix = os.path.join(workdir, f"spm{vocab}")
    if not os.path.exists(prefix + ".model"):
        train_sentencepiece(SentencePieceTrainConfig(
            inputs=[one_pass], output_prefix=prefix, vocab_size=vocab,
            max_sentences=300_000, input_sentence_size=300_000))
    return prefix + ".model"


def run_pipeline(path: str, model: str, workers: int, out_prefix: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path,
           "--output-prefix", out_prefix, "--tokenizer-type", "SentencePieceTokenizer",
           "--tokenizer-model", model, "--append-eod", "--workers", str(workers),
           "--no-progress"]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRSS(proc.pid)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    peak = rss.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"preprocess_data failed:\n{err}")
    info = check_indexed_dataset(out_prefix + "_text_document")
    tokens = info.num_tokens - info.num_documents  # without the EODs
    return {"seconds": seconds, "tokens": tokens, "peak_rss": peak,
            "cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "bytes": os.path.getsize(path)}


def best_run(path: str, model: str, workers: int, out: str, repeats: int) -> dict:
    """Fastest of ``repeats`` runs, with the highest peak RSS seen in any of them."""
    runs = [run_pipeline(path, model, workers, out) for _ in range(repeats)]
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["peak_rss"] = max(r["peak_rss"] for r in runs)
    return best


def _init_baseline(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model, num_threads=1)


def _encode_range(args: tuple[int, int, str]) -> int:
    start, stop, kind = args
    batch = _texts[start:stop]
    if kind == "numpy":
        return sum(a.size for a in _sp.encode(batch, return_type="numpy", num_threads=1))
    return sum(len(ids) for ids in _sp.encode(batch, out_type=int, num_threads=1))


def run_baseline(model: str, workers: int, kind: str) -> dict:
    ranges, start, size = [], 0, 0
    for i, text in enumerate(_texts):
        size += len(text)
        if size >= BATCH_BYTES:
            ranges.append((start, i + 1, kind))
            start, size = i + 1, 0
    if start < len(_texts):
        ranges.append((start, len(_texts), kind))
    with Pool(workers, initializer=_init_baseline, initargs=(model,)) as pool:
        pool.map(_encode_range, ranges[:workers])  # warm up: tokenizer loaded in each worker
        begin = time.perf_counter()
        tokens = sum(pool.imap_unordered(_encode_range, ranges))
        seconds = time.perf_counter() - begin
    return {"seconds": seconds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size N in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--workdir", default="/tmp/megatron_longctx_bench")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "preprocess.md"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    one_pass = corpus(args.workdir, 1)
    repeat = math.ceil(args.mb * 1e6 / os.path.getsize(one_pass))
    path_n, path_2n = corpus(args.workdir, repeat), corpus(args.workdir, 2 * repeat)
    model = sp_model(args.workdir, one_pass, args.vocab_size)
    out = os.path.join(args.workdir, "out")

    _texts.extend(t[0] for t in DocumentReader([path_n]))
    baselines = {kind: min((run_baseline(model, args.workers, kind)
                            for _ in range(args.repeats)), key=lambda r: r["seconds"])
                 for kind in ("int", "numpy")}
    _texts.clear()
    pipe_n, pipe_2n = (best_run(path, model, args.workers, out, args.repeats)
                       for path in (path_n, path_2n))
    assert all(b["tokens"] == pipe_n["tokens"] for b in baselines.values()), \
        (pipe_n["tokens"], {k: b["tokens"] for k, b in baselines.items()})

    def rate(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    best = max(rate(b) for b in baselines.values())
    mb = pipe_n["bytes"] / 1e6
    rows = [
        [f"bare SentencePiece `encode(list)` -> lists, {args.workers}-process pool",
         f"{mb:.0f}", f"{baselines['int']['seconds']:.1f}", f"{rate(baselines['int']) / 1e6:.3f}",
         f"{rate(baselines['int']) / best:.2f}", "n/a", "n/a"],
        [f"bare SentencePiece `encode(list)` -> numpy, {args.workers}-process pool",
         f"{mb:.0f}", f"{baselines['numpy']['seconds']:.1f}",
         f"{rate(baselines['numpy']) / 1e6:.3f}", f"{rate(baselines['numpy']) / best:.2f}",
         "n/a", "n/a"],
    ]
    for label, r in ((f"`preprocess_data.py --workers {args.workers}`, N", pipe_n),
                     (f"`preprocess_data.py --workers {args.workers}`, 2N", pipe_2n)):
        rows.append([label, f"{r['bytes'] / 1e6:.0f}", f"{r['seconds']:.1f}",
                     f"{rate(r) / 1e6:.3f}", f"{rate(r) / best:.2f}",
                     f"{r['peak_rss'] / 2**20:.0f}", f"{r['cpu']:.1f}"])
    load = os.getloadavg()
    notes = (
        f"Corpus: Python stdlib sources repeated ({repeat}x and {2 * repeat}x, "
        f"{pipe_n['tokens']:,} tokens at N), SentencePiece BPE vocab {args.vocab_size} trained "
        f"on one pass (tools/train_tokenizer.py settings). Ratio = tokens/s over the fastest "
        f"bare-tokenizer row; the pipeline's time is launch-to-exit of the CLI (startup, "
        f"reading, JSON parsing, tokenizing, writing .bin/.idx) while the bare rows time only "
        f"`encode` on texts already in each worker's memory. Peak RSS: sum over the main "
        f"process and its workers (shared pages counted per process, so an upper bound); "
        f"CPU s: user+sys of all of them. Best of {args.repeats} runs (peak RSS: the highest). "
        f"Load average at the end: {load[0]:.1f} (other jobs on the machine distort timings). "
        f"Measured separately (cProfile, in-process run at N): the main process (reading, "
        f"writing, index) used "
        f"~0.7 CPU s of ~27; the workers' CPU matched the bare encode's, so the gap is "
        f"interpreter start-up, the main process sharing the 2 cores, and the last chunk. "
        f"Command: `python benchmarks/preprocess.py --mb {args.mb:g} --workers {args.workers}`.")
    text = write_markdown(
        args.out, f"Preprocessing throughput and memory ({args.workers} workers)",
        ["run", "MB", "seconds", "Mtok/s", "ratio to bare tokenizer", "peak RSS MiB", "CPU s"],
        rows, notes)
    print(text)


if __name__ == "__main__":
    main()
