#!/usr/bin/env python
"""Concatenate Megatron indexed datasets (.bin/.idx) into one, streaming.

Documents keep their order: all of the first input, then the second, ... Every input is
checked first (header, sizes, index consistency); all must share a token dtype (i.e. come
from tokenizers with the same vocabulary size). The output appears only when complete.

Example:
    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \
        --output-prefix data/all_text_document
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.data.indexed_reader import check_indexed_dataset  # noqa: E402
from megatron_longctx.data.indexed_writer import OutputInUseError, merge_datasets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset path prefixes (without .bin/.idx), merged in this order")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        merge_datasets(args.input, args.output_prefix)
        info = check_indexed_dataset(args.output_prefix, full=False)
    except (ValueError, OutputInUseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {info.bin_path} / {info.idx_path}: {info.num_documents:,} documents, "
          f"{info.num_tokens:,} {info.dtype} tokens from {len(args.input)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
