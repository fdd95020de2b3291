"""Train a SentencePiece BPE tokenizer on JSONL / Parquet documents.

Writes {output-prefix}.model and {output-prefix}.vocab, for
``tools/preprocess_data.py --tokenizer-type SentencePieceTokenizer --tokenizer-model
{output-prefix}.model``. Llama-style settings: lossless (identity normalization, whitespace
kept), digits split, byte fallback on by default, EOS id 2.

Example (32k vocabulary from a 10M-line sample of the corpus):
    python tools/train_tokenizer.py --input 'corpus/*.jsonl.zst' --json-keys text \
        --vocab-size 32000 --input-sentence-size 10000000 --output-prefix tok/spm32k
"""

import argparse
import os
import sys

from megatron_longctx.data.tokenization.sentencepiece_trainer import (
    SentencePieceTrainConfig,
    train_sentencepiece,
)


def parse_args(argv: list[str] | None = None) -> SentencePieceTrainConfig:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True,
                        help="JSONL(.gz/.zst) or .parquet file or glob; may be repeated")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="encode characters outside the vocabulary as UTF-8 byte pieces")
    parser.add_argument("--user-defined-symbols", default="",
                        help="comma-separated pieces that are always single tokens")
    parser.add_argument("--max-sentences", type=int, default=None,
                        help="stop reading input after this many lines")
    parser.add_argument("--input-sentence-size", type=int, default=10_000_000,
                        help="lines SentencePiece samples (uniformly) and keeps in memory; "
                             "0 = all")
    parser.add_argument("--character-coverage", type=float, default=0.9999)
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    symbols = args.user_defined_symbols.split(",") if args.user_defined_symbols else []
    return SentencePieceTrainConfig(
        inputs=args.input, output_prefix=args.output_prefix, vocab_size=args.vocab_size,
        json_keys=args.json_keys, byte_fallback=args.byte_fallback,
        user_defined_symbols=symbols, max_sentences=args.max_sentences,
        input_sentence_size=args.input_sentence_size,
        character_coverage=args.character_coverage, num_threads=args.num_threads)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        path = train_sentencepiece(cfg, log=lambda msg: print(msg, file=sys.stderr))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {cfg.output_prefix}.vocab (vocab size {cfg.vocab_size})")
    return 0

