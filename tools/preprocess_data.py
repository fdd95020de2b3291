#!/usr/bin/env python
"""Tokenize JSONL / JSONL.gz / JSONL.zst / Parquet files into Megatron indexed datasets.

Flags follow Megatron-LM's tools/preprocess_data.py; outputs are
``{output_prefix}_{key}_document.bin/.idx`` per ``--json-keys`` key, readable by megatron-core's
``IndexedDataset``. Bad records are skipped and counted (``--strict``: stop at the first);
outputs appear only when the run completes.

Example (2 worker processes, SentencePiece model from tools/train_tokenizer.py):
    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/spm.model \
        --append-eod --workers 2
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.data.indexed_writer import OutputInUseError  # noqa: E402
from megatron_longctx.data.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from megatron_longctx.data.tokenizers import tokenizer_types  # noqa: E402


def parse_args(argv: list[str] | None = None) -> PreprocessConfig:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", action="append", required=True,
                       help="JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or .parquet file, or a glob; "
                            "may be repeated")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys (Parquet: columns) to tokenize; one output dataset per key")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first malformed record instead of skipping it")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=tokenizer_types())
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model file, or a local HuggingFace tokenizer "
                            "directory / tokenizer.json")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's EOS id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="tokenizer processes (the main process reads and writes)")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress-bar updates")
    group.add_argument("--chunk-mb", type=float, default=1.0,
                       help="MB of input per unit of work sent to a worker")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, json_keys=args.json_keys,
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        append_eod=args.append_eod, workers=args.workers, strict=args.strict,
        log_interval=args.log_interval, chunk_bytes=max(1, int(args.chunk_mb * 1e6)),
        progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run_preprocess(cfg)
    except (ValueError, OutputInUseError) as exc:  # bad flags or input, live run on the prefix
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
