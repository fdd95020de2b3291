"""Concatenate Megatron indexed datasets (.bin/.idx) into one, streaming.

Documents keep their order: all of the first input, then the second, ... An ``--input`` entry
is a dataset prefix, a directory (every dataset in it, in sorted order, as Megatron-LM's
merge tool takes it) or a quoted glob of prefixes (sorted). Shards written by
``preprocess_data.py --num-shards`` are checked to be complete first: every shard of the run
finished with the same settings, and none is missing from the list, so merging the shards gives
exactly the dataset of a one-process run. Every input is checked (header, sizes, index
consistency); all must share a token dtype (i.e. come from tokenizers with the same vocabulary
size). The output appears only when complete; memory stays flat whatever the sizes.

Example:
    python tools/merge_datasets.py --input 'data/corpus_shard*_text_document' \
        --output-prefix data/corpus_text_document
"""

import argparse
import os
import sys
import time

from megatron_longctx.data.formats.indexed_reader import check_indexed_dataset
from megatron_longctx.data.formats.indexed_writer import OutputInUseError, merge_datasets
from megatron_longctx.data.preprocessing.shards import check_shard_set, resolve_prefixes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset path prefixes (without .bin/.idx), directories or quoted "
                             "globs, merged in this order")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        prefixes = resolve_prefixes(args.input)
        if os.path.abspath(args.output_prefix) in map(os.path.abspath, prefixes):
            raise ValueError(f"--output-prefix {args.output_prefix} is also an input; write the "
                             f"merge elsewhere.")
        check_shard_set(prefixes)
        merge_datasets(prefixes, args.output_prefix)
        info = check_indexed_dataset(args.output_prefix, full=False)
    except (ValueError, OutputInUseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    size = os.path.getsize(info.bin_path) + os.path.getsize(info.idx_path)
    print(f"wrote {info.bin_path} / {info.idx_path}: {info.num_documents:,} documents, "
          f"{info.num_tokens:,} {info.dtype} tokens from {len(prefixes)} datasets "
          f"({size / 1e9:,.3f} GB in {seconds:,.1f} s, {size / 1e9 / max(seconds, 1e-9):,.2f} "
          f"GB/s)")
    return 0
