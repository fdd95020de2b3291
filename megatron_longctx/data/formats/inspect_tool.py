"""Check a Megatron indexed dataset and print its statistics, or decode one document.

Prints documents, sequences, tokens, dtype and a document-length histogram (with the counts of
documents of at least 32k/64k/128k tokens). A missing or corrupt .bin/.idx is reported with
the file and what is wrong. Several prefixes, a directory or a quoted glob (e.g. the shards of
``preprocess_data.py --num-shards``) are read as one concatenation, in order: one line per
dataset, then the statistics of all of them; ``--document`` counts across them.

Examples:
    python tools/inspect_dataset.py --path-prefix data/corpus_text_document
    python tools/inspect_dataset.py --path-prefix 'data/corpus_shard*_text_document'
    python tools/inspect_dataset.py --path-prefix data/corpus_text_document --document 17 \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/spm.model
"""

import argparse
import sys

from megatron_longctx.data.formats.doc_stats import LengthStats
from megatron_longctx.data.formats.indexed_reader import check_indexed_dataset
from megatron_longctx.data.preprocessing.shards import resolve_prefixes
from megatron_longctx.data.tokenization.tokenizers import build_tokenizer, tokenizer_types


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path-prefix", required=True, nargs="+",
                        help="dataset prefix (no .bin/.idx); several, a directory or a quoted "
                             "glob: their concatenation")
    parser.add_argument("--document", type=int, default=None,
                        help="decode this document (0-based) instead of printing statistics")
    parser.add_argument("--tokenizer-type", choices=tokenizer_types(), default=None)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--ids", action="store_true", help="with --document: print token ids")
    args = parser.parse_args(argv)
    try:
        infos = [check_indexed_dataset(p) for p in resolve_prefixes(args.path_prefix)]
        if args.document is not None:
            return _show_document(infos, args)
    except (ValueError, IndexError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats = LengthStats()
    for info in infos:
        part = LengthStats()
        for lengths in info.iter_document_lengths():
            part.update(lengths)
        stats.merge(part)
        print(f"{info.bin_path} / {info.idx_path}")
        counts = (f", documents: {part.documents:,}, tokens: {part.tokens:,}"
                  if len(infos) > 1 else "")
        print(f"dtype: {info.dtype}, sequences: {info.sequence_count:,}"
              f"{', multimodal (sequence modes present)' if info.multimodal else ''}{counts}")
    if len(infos) > 1:
        print(f"all {len(infos)} datasets:")
    print(stats.format())
    return 0


def _show_document(infos, args) -> int:
    index = args.document
    for info in infos:  # the document's dataset in the concatenation
        if 0 <= index < info.num_documents or info is infos[-1]:
            break
        index -= info.num_documents
    if index < 0 or index >= info.num_documents:
        total = sum(i.num_documents for i in infos)
        raise IndexError(f"document {args.document} out of range: the datasets hold {total} "
                         f"documents (0..{total - 1}).")
    tokens = info.read_document(index)
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

