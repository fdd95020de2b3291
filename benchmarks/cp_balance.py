#!/usr/bin/env python
"""Attention work per CP rank on packed documents: sample-level chunks vs per-document chunks.

With document masks, the attention work of a query is the number of keys it sees (its position
in its document + 1). A CP step waits for the busiest rank, so what matters per sample is
``max over ranks / mean over ranks`` of that work (1.0: balanced). Compared, side by side on
the same samples:

* ``sequence``: the sample cut into ``2 cp`` chunks, rank ``r`` holding ``r`` and
  ``2 cp - 1 - r`` (megatron-core's layout; balanced for one causal document);
* ``document``: every document cut that way (``--cp-partition document``, Transformer
  Engine's THD layout), documents padded to a multiple of ``2 cp`` slots (padding does no
  work: TE skips it), which pushes some tail tokens out of the sample (counted).

Data: Python's standard-library sources as documents (bytes as tokens: real, long-tailed
lengths, 0.1-300 KB), shuffled and packed into ``--seq-length`` samples in order, documents cut
at sample ends (as Megatron's GPTDataset). Pure counting: no model runs.

    python benchmarks/cp_balance.py --seq-length 131072 --samples 64
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_markdown  # noqa: E402
from megatron_longctx.data.corpora.stdlib_corpus import stdlib_files  # noqa: E402
from megatron_longctx.model.document_partition import partition_documents  # noqa: E402


def packed_samples(seq_length: int, count: int, seed: int) -> list[list[int]]:
    """Document starts of ``count`` packed samples."""
    lengths = np.array([p.stat().st_size for p in stdlib_files()])
    lengths = lengths[lengths > 0]
    lengths = lengths[np.random.default_rng(seed).permutation(len(lengths))]
    samples, starts, filled = [], [0], 0
    for n in np.tile(lengths, 1 + count * seq_length // int(lengths.sum())):
        while n > 0:
            take = min(int(n), seq_length - filled)
            filled += take
            n -= take
            if filled == seq_length:
                samples.append(starts)
                if len(samples) == count:
                    return samples
                starts, filled = [0], 0
            elif n == 0:
                starts.append(filled)
    return samples


def work_per_position(starts: list[int], length: int) -> np.ndarray:
    """``[length]``: keys each query sees (its position in its document + 1)."""
    doc_start = np.zeros(length, dtype=np.int64)
    for s in starts[1:]:
        doc_start[s:] = s
    return np.arange(length) - doc_start + 1


def sequence_loads(starts: list[int], s: int, cp: int) -> np.ndarray:
    chunks = work_per_position(starts, s).reshape(2 * cp, -1).sum(axis=1)
    return np.array([chunks[r] + chunks[2 * cp - 1 - r] for r in range(cp)])


def document_loads(starts: list[int], s: int, cp: int) -> tuple[np.ndarray, int]:
    layout = partition_documents(starts, s, cp)
    work = np.zeros(s, dtype=np.int64)  # per slot; padding slots do none
    for start, length in zip(layout.starts, layout.lengths):
        work[start:start + length] = np.arange(1, length + 1)
    loads = np.array([work[layout.rank_slots(r).numpy()].sum() for r in range(cp)])
    return loads, s - layout.kept_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-length", type=int, default=131072)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "cp_balance.md"))
    args = parser.parse_args()
    s = args.seq_length
    samples = packed_samples(s, args.samples, args.seed)
    docs = np.mean([len(st) for st in samples])
    rows = []
    for cp in args.cp:
        imbalance = {"sequence": [], "document": []}
        busiest_ratio, dropped = [], 0
        for starts in samples:
            seq = sequence_loads(starts, s, cp)
            doc, lost = document_loads(starts, s, cp)
            imbalance["sequence"].append(seq.max() / seq.mean())
            imbalance["document"].append(doc.max() / doc.mean())
            busiest_ratio.append(doc.max() / seq.max())
            dropped += lost
        row = [cp]
        for name in ("sequence", "document"):
            values = np.array(imbalance[name])
            row += [f"{values.mean():.3f}", f"{values.max():.3f}"]
        row += [f"{np.mean(busiest_ratio):.3f}", f"{100 * dropped / (s * len(samples)):.3f}"]
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)
    header = ["CP", "sequence: busiest/mean (mean)", "sequence: worst sample",
              "document: busiest/mean (mean)", "document: worst sample",
              "busiest rank, document / sequence", "tokens dropped (%)"]
    notes = (f"{len(samples)} samples of {s} tokens, {docs:.1f} documents per sample on "
             f"average (Python standard-library files as byte-token documents, shuffled, "
             f"packed in order, seed {args.seed}). Work: keys seen per query with document "
             f"masks (attention FLOPs up to a constant). busiest/mean: the busiest CP rank's "
             f"work over the ranks' mean (1.0 = balanced; a CP step waits for the busiest). "
             f"busiest rank, document / sequence: the step's attention time under the "
             f"per-document partition relative to the sample-level one (< 1: faster). Tokens "
             f"dropped: pushed out of the samples by padding each document to a multiple of "
             f"2 CP. Command: `python benchmarks/cp_balance.py --seq-length {s} --samples "
             f"{args.samples}`.")
    print(write_markdown(args.out, "Attention work per CP rank: sample-level vs per-document "
                         "chunks", header, rows, notes))


if __name__ == "__main__":
    main()
