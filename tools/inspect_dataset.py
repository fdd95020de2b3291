#!/usr/bin/env python
"""Check a Megatron indexed dataset and print its statistics, or decode one document.

Prints documents, sequences, tokens, dtype and a document-length histogram (with the counts of
documents of at least 32k/64k/128k tokens). A missing or corrupt .bin/.idx is reported with
the file and what is wrong.

Examples:
    python tools/inspect_dataset.py --path-prefix data/corpus_text_document
    python tools/inspect_dataset.py --path-prefix data/corpus_text_document --document 17 \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/spm.model
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.data.doc_stats import LengthStats  # noqa: E402
from megatron_longctx.data.indexed_reader import check_indexed_dataset  # noqa: E402
from megatron_longctx.data.tokenizers import build_tokenizer, tokenizer_types  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path-prefix", required=True, help="dataset prefix (no .bin/.idx)")
    parser.add_argument("--document", type=int, default=None,
                        help="decode this document (0-based) instead of printing statistics")
    parser.add_argument("--tokenizer-type", choices=tokenizer_types(), default=None)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--ids", action="store_true", help="with --document: print token ids")
    args = parser.parse_args(argv)
    try:
        info = check_indexed_dataset(args.path_prefix)
        if args.document is not None:
            return _show_document(info, args)
    except (ValueError, IndexError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats = LengthStats()
    for lengths in info.iter_document_lengths():
        stats.update(lengths)
    print(f"{info.bin_path} / {info.idx_path}")
    print(f"dtype: {info.dtype}, sequences: {info.sequence_count:,}"
          f"{', multimodal (sequence modes present)' if info.multimodal else ''}")
    print(stats.format())
    return 0


def _show_document(info, args) -> int:
    tokens = info.read_document(args.document)
    if args.ids:
        print(" ".join(str(int(t)) for t in tokens))
        return 0
    if args.tokenizer_type is None:
        raise ValueError("--document needs --tokenizer-type (and --tokenizer-model) to decode; "
                         "or pass --ids to print token ids.")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    print(f"# document {args.document}: {tokens.size:,} tokens", file=sys.stderr)
    sys.stdout.write(tokenizer.detokenize(tokens.tolist()))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
