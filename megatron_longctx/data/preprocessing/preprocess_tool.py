"""Tokenize JSONL / JSONL.gz / JSONL.zst / Parquet files into Megatron indexed datasets.

Flags follow Megatron-LM's tools/preprocess_data.py; outputs are
``{output_prefix}_{key}_document.bin/.idx`` per ``--json-keys`` key (``_sentence`` with
``--split-sentences``), readable by megatron-core's ``IndexedDataset``. Bad records are skipped
and counted (``--strict``: stop at the first); input that yields no document is an error;
outputs appear only when the run completes.

Example (2 worker processes, SentencePiece model from tools/train_tokenizer.py):
    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/spm.model \
        --append-eod --workers 2

One shard of 64 (e.g. one task of a Slurm job array, where the shard flags default to the
array task), then the merge (examples/slurm/preprocess.sbatch does both):
    python tools/preprocess_data.py ... --num-shards 64 --shard-index 5
    python tools/merge_datasets.py --input 'data/corpus_shard*_text_document' \
        --output-prefix data/corpus_text_document
"""

import argparse
import sys

from megatron_longctx.data.formats.indexed_writer import OutputInUseError
from megatron_longctx.data.preprocessing.preprocess import PreprocessConfig, run_preprocess
from megatron_longctx.data.preprocessing.tokenize_pipeline import PreprocessError
from megatron_longctx.data.tokenization.tokenizers import tokenizer_types


def parse_args(argv: list[str] | None = None) -> PreprocessConfig:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", action="append", required=True,
                       help="JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or .parquet file, or a glob "
                            "(matches taken in sorted order); may be repeated")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys (Parquet: columns) to tokenize; one output dataset per key")
    group.add_argument("--split-sentences", action="store_true",
                       help="split documents into sentences, one sequence each (pysbd; "
                            "outputs are named _sentence)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the whitespace and newlines after "
                            "each sentence")
    group.add_argument("--chat-template", default=None,
                       help="values are conversations (lists of role/content messages, or "
                            "prompt/response keys) rendered with the tokenizer's chat template "
                            "(auto), the plain one (plain) or a Jinja file")
    group.add_argument("--mask-prompt-loss", action="store_true",
                       help="with --chat-template: train only on the assistant replies; the "
                            "loss mask (0 for system/user turns and role markers) is written "
                            "beside the dataset ({prefix}.side_loss_mask.bin/.idx) and training "
                            "applies it")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first malformed record instead of skipping it")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=tokenizer_types())
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model file, a local HuggingFace tokenizer "
                            "directory / tokenizer.json, or a TikTokenizer vocabulary .json")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: ids 0..N-1 (N is the EOD); TikTokenizer: its size")
    group.add_argument("--tiktoken-pattern", choices=("v1", "v2"), default=None,
                       help="TikTokenizer's pre-tokenization regex (default v2)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids reserved for special tokens before the ranks")
    group.add_argument("--legacy-tokenizer", action="store_true",
                       help="Megatron-LM's legacy tokenizer classes: Llama2Tokenizer and "
                            "HuggingFaceTokenizer add BOS")
    group.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                       help="HuggingFaceTokenizer: add the special tokens its post-processor "
                            "adds (BOS for Llama tokenizers)")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's EOD id to every document")
    group.add_argument("--lang", default="english",
                       help="language of --split-sentences (NLTK name or ISO code)")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="tokenizer processes (in all partitions together)")
    group.add_argument("--partitions", type=int, default=1,
                       help="parallel readers on this node, each with workers/partitions "
                            "tokenizer processes; same output as one")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted for Megatron-LM compatibility: the input order is always "
                            "kept")
    group.add_argument("--num-shards", type=int, default=None,
                       help="split the input into N shards and process one (default inside a "
                            "Slurm job array: SLURM_ARRAY_TASK_COUNT)")
    group.add_argument("--shard-index", type=int, default=None,
                       help="the shard to process, 0..N-1 (default inside a Slurm job array: "
                            "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
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
        progress=not args.no_progress, vocab_file=args.vocab_file, merge_file=args.merge_file,
        vocab_size=args.vocab_size, tiktoken_pattern=args.tiktoken_pattern,
        tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
        legacy_tokenizer=args.legacy_tokenizer,
        hf_include_special_tokens=args.tokenizer_hf_include_special_tokens,
        split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, lang=args.lang,
        chat_template=args.chat_template, mask_prompt_loss=args.mask_prompt_loss,
        partitions=args.partitions, keep_sequential_samples=args.keep_sequential_samples,
        num_shards=args.num_shards, shard_index=args.shard_index)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run_preprocess(cfg)
    except (ValueError, OutputInUseError, PreprocessError) as exc:
        # bad flags or input, a live run on the prefix, a dead worker: one line, no outputs
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0
