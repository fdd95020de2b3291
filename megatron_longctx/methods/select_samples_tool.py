"""``tools/select_long_samples.py``: LongRecipe's training samples from an indexed dataset and
the anchor tokens of ``tools/analyze_impactful_tokens.py``::

    python tools/select_long_samples.py --data long_text_document \\
        --anchors runs/impactful/anchor_tokens.json \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model runs/base/tokenizer \\
        --target-length 131072 --output-prefix data/longrecipe_text_document

keeps the sentences holding an anchor token (and ``--keep-other`` of the rest), writes samples
of ``--seq-length`` (default 30% of ``--target-length``) plus one label token as a new indexed
dataset, one sample per document, with their LongRecipe position ids as side data
(``{output}.side_position_ids``): ``--data-path OUTPUT`` trains on exactly these positions.
``{output}.selection.json`` records the counts and the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
from tqdm import tqdm

from megatron_longctx.data.formats.side_data import side_writer
from megatron_longctx.data.tokenization.tokenizers import build_tokenizer, tokenizer_types
from megatron_longctx.methods.impactful_tokens import load_anchor_tokens
from megatron_longctx.methods.position_transform import sentence_end_table
from megatron_longctx.methods.sample_selection import SelectionCounts, select_document

logger = logging.getLogger("megatron_longctx")


def default_seq_length(target: int) -> int:
    """30% of the target window (the seed's 38.4k for 128k), a multiple of 64 so that
    context-parallel chunks (2 x CP) divide it."""
    return max(64, int(0.3 * target) // 64 * 64)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="indexed dataset prefix (.bin/.idx)")
    p.add_argument("--anchors", required=True,
                   help="anchor_tokens.json of tools/analyze_impactful_tokens.py")
    p.add_argument("--min-anchor-count", type=int, default=1,
                   help="anchor tokens kept at least this many times in the analysis")
    p.add_argument("--tokenizer-type", required=True, choices=tokenizer_types())
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer's vocabulary")
    p.add_argument("--target-length", type=int, required=True,
                   help="L': the window the position ids span")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sample (default: 30%% of --target-length, multiple of 64)")
    p.add_argument("--keep-other", type=float, default=0.0,
                   help="fraction of sentences without anchors kept at random")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-prefix", required=True)
    return p


def _check(args) -> None:
    if args.seq_length is None:
        args.seq_length = default_seq_length(args.target_length)
    if not 0 < args.seq_length <= args.target_length:
        raise ValueError(f"--seq-length {args.seq_length} must be in [1, --target-length "
                         f"{args.target_length}]")
    if not 0.0 <= args.keep_other <= 1.0:
        raise ValueError(f"--keep-other must be in [0, 1], got {args.keep_other}")
    if os.path.exists(args.output_prefix + ".idx"):
        raise ValueError(f"{args.output_prefix}.idx exists; choose another --output-prefix or "
                         f"delete it")
    if os.path.abspath(args.output_prefix) == os.path.abspath(args.data):
        raise ValueError("--output-prefix must differ from --data")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _check(args)
    from megatron_longctx.data.formats.indexed_writer import IndexedDatasetWriter
    from megatron_longctx.data.samples.long_context_dataset import open_indexed

    indexed = open_indexed(args.data)  # validated before any work
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    counts_by_id = load_anchor_tokens(args.anchors)
    anchors = np.zeros(tokenizer.vocab_size, dtype=bool)  # [vocab]
    ids = [t for t, c in counts_by_id.items() if c >= args.min_anchor_count]
    if not ids:
        raise ValueError(f"{args.anchors}: no anchor token kept {args.min_anchor_count} times "
                         f"or more; lower --min-anchor-count")
    if max(ids) >= tokenizer.vocab_size:
        raise ValueError(f"{args.anchors}: token id {max(ids)} is outside the vocabulary "
                         f"({tokenizer.vocab_size}) of --tokenizer-model; use the tokenizer "
                         f"of the analysed checkpoints")
    anchors[ids] = True
    ends = sentence_end_table(tokenizer)
    counts, started = SelectionCounts(), time.perf_counter()
    lengths = np.asarray(indexed.sequence_lengths)
    with IndexedDatasetWriter(args.output_prefix, dtype=indexed.get(0).dtype) as out, \
            side_writer(args.output_prefix, "position_ids") as side:
        bar = tqdm(total=int(lengths.sum()), unit="tok", unit_scale=True, desc="select")
        for doc in range(len(lengths)):
            tokens = indexed.get(doc).astype(np.int64)  # [n]
            for sample, positions in select_document(
                    tokens, ends, anchors, args.keep_other, args.seed, doc, args.seq_length,
                    args.target_length, counts):
                out.add_document(sample)
                side.add_document(positions)
            bar.update(len(tokens))
        bar.close()
        if counts.samples == 0:
            raise ValueError(f"{args.data}: no document keeps {args.seq_length + 1} tokens of "
                             f"anchor sentences; lower --seq-length or raise --keep-other")
        # side data first: a dataset never appears without its positions
        side.finalize()
        out.finalize()
    summary = {**counts.as_dict(), "seconds": round(time.perf_counter() - started, 2),
               "data": os.path.abspath(args.data), "anchors": os.path.abspath(args.anchors),
               "anchor_ids": len(ids), "seq_length": args.seq_length,
               "target_length": args.target_length, "keep_other": args.keep_other,
               "seed": args.seed, "position_transform": "longrecipe"}
    with open(args.output_prefix + ".selection.json", "w") as f:
        json.dump(summary, f, indent=1)
    logger.info("%d samples of %d tokens from %d documents: %d of %d sentences hold anchors, "
                "%d others kept; train with --data-path %s --seq-length %d", counts.samples,
                args.seq_length, counts.documents, counts.anchor_sentences, counts.sentences,
                counts.other_sentences_kept, args.output_prefix, args.seq_length)
    return summary
