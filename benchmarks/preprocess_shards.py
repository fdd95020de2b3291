#!/usr/bin/env python
"""Ways to spend the same cores on one corpus: 1 shard x W workers, W shards x 1 worker (then
the merge), ``--partitions W``; the merge's throughput and memory; Megatron-LM's
``tools/preprocess_data.py --partitions`` beside them when a checkout is given.

* Corpus and tokenizer: ``benchmarks/preprocess.py``'s (Python stdlib sources repeated to
  >= ``--mb`` MB of JSONL, SentencePiece BPE), cached in ``--workdir``.
* Each row is the best wall time of ``--repeats`` interleaved runs, from launch to the last
  process's exit (shards: all started at once; the merge is timed once), with the peak of the
  summed RSS of all processes (sampled every 20 ms). Outputs are checked byte-identical to
  the 1-shard run.
* Merge: ``tools/merge_datasets.py`` of the W shards; GB/s = (.bin + .idx bytes written) / s.
* ``--megatron-lm DIR``: Megatron-LM's own script (``DIR/tools/preprocess_data.py``, run with
  ``PYTHONPATH=DIR``; its tools are not on PyPI) with ``--partitions W --workers W``.

    python benchmarks/preprocess_shards.py [--mb 100] [--workers 2] [--megatron-lm DIR]
"""

import argparse
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PeakRSS, write_markdown  # noqa: E402
from benchmarks.preprocess import corpus, sp_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def run_all(cmds: list[list[str]], env: dict | None = None) -> tuple[float, int]:
    """Start every command at once; (seconds until the last exits, peak summed RSS)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env) for c in cmds]
    monitors = [PeakRSS(p.pid) for p in procs]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - start
    peak = sum(m.stop() for m in monitors)
    for p, err in zip(procs, errors):
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmds[0][:3])} ... failed:\n{err[-3000:]}")
    return seconds, peak


def clear(prefix: str) -> None:
    """Remove a run's shards: a rerun would skip them as finished."""
    directory, name = os.path.split(prefix)
    for f in os.listdir(directory):
        if f.startswith(name + "_shard"):
            os.remove(os.path.join(directory, f))


def files_bytes(prefix: str) -> bytes:
    return b"".join(open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--workdir", default="/tmp/megatron_longctx_bench")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "preprocess_shards.md"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    one_pass = corpus(args.workdir, 1)
    path = corpus(args.workdir, math.ceil(args.mb * 1e6 / os.path.getsize(one_pass)))
    model = sp_model(args.workdir, one_pass, args.vocab_size)
    out = os.path.join(args.workdir, "shards_out")
    os.makedirs(out, exist_ok=True)
    w = args.workers
    base = [sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", path,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
            "--append-eod", "--no-progress"]
    mb = os.path.getsize(path) / 1e6
    one, shard, merged, parts = (os.path.join(out, n) for n in ("one", "sh", "merged", "parts"))
    configs = {
        f"1 shard x {w} workers": lambda: run_all(
            [[*base, "--output-prefix", one, "--workers", str(w)]]),
        f"{w} shards x 1 worker (shards only)": lambda: clear(shard) or run_all(
            [[*base, "--output-prefix", shard, "--workers", "1", "--num-shards", str(w),
              "--shard-index", str(i)] for i in range(w)]),
        f"`--partitions {w} --workers {w}`": lambda: run_all(
            [[*base, "--output-prefix", parts, "--workers", str(w), "--partitions", str(w)]]),
    }
    if args.megatron_lm:
        env = {**os.environ, "PYTHONPATH": args.megatron_lm}
        mlm_cmd = [sys.executable, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"),
                   "--input", path, "--output-prefix", os.path.join(out, "mlm"),
                   "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                   "--append-eod", "--workers", str(w), "--partitions", str(w),
                   "--keep-sequential-samples"]
        configs[f"Megatron-LM `--partitions {w} --workers {w}`"] = lambda: run_all([mlm_cmd], env)
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):  # interleaved, so that a change of load hits every row
        for name, run in configs.items():
            seconds, peak = run()
            old = best.get(name, (float("inf"), 0))
            best[name] = (min(old[0], seconds), max(old[1], peak))
    merge_s, merge_peak = run_all([[sys.executable, os.path.join(TOOLS, "merge_datasets.py"),
                                    "--input", f"{shard}_shard*_text_document",
                                    "--output-prefix", merged]])
    reference = files_bytes(one + "_text_document")
    assert files_bytes(merged) == reference, "merged shards differ from the 1-shard run"
    assert files_bytes(parts + "_text_document") == reference
    best[f"{w} shards x 1 worker + merge"] = (
        best[f"{w} shards x 1 worker (shards only)"][0] + merge_s,
        max(best[f"{w} shards x 1 worker (shards only)"][1], merge_peak))
    first = best[f"1 shard x {w} workers"][0]
    rows = [[name, f"{sec:.1f}", f"{mb / sec:.2f}", f"{first / sec:.2f}", f"{peak / 2**20:.0f}"]
            for name, (sec, peak) in best.items()]

    written = sum(os.path.getsize(f"{merged}.{e}") for e in ("bin", "idx"))
    notes = (
        f"Corpus: {mb:.0f} MB of JSONL (Python stdlib sources repeated), SentencePiece BPE "
        f"vocab {args.vocab_size}, `--append-eod`. Best of {args.repeats} interleaved runs "
        f"(peak RSS: the highest). Speed-up: over the first row. Outputs are byte-identical "
        f"to the first row's. Merge of the {w} shards: {merge_s:.2f} s for "
        f"{written / 1e9:.3f} GB written ({written / 1e9 / merge_s:.2f} GB/s including "
        f"interpreter start-up), peak RSS {merge_peak / 2**20:.0f} MiB (it streams: the index "
        f"in 1 Mi-entry blocks, the .bin copied in 1 MiB buffers). "
        + ("" if args.megatron_lm else "No Megatron-LM row: run with `--megatron-lm DIR` (a "
           "checkout; its tools are not on PyPI). ")
        + f"Load average at the end: {os.getloadavg()[0]:.1f}. Command: `python "
          f"benchmarks/preprocess_shards.py --mb {args.mb:g} --workers {w}`.")
    print(write_markdown(args.out, f"Shards, partitions and merge ({w} cores' worth)",
                         ["run", "seconds", "MB/s", "speed-up", "peak RSS MiB"], rows, notes))


if __name__ == "__main__":
    main()
