"""What every evaluation tool shares: checkpoints to load, the parallel layout under torchrun,
the tokenizer (by default the one the first checkpoint was trained with), the output folder."""

from __future__ import annotations

import argparse
import json
import os

from megatron_longctx.config import ParallelConfig


def add_checkpoint_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--load", nargs="+", required=True, help="checkpoint directories")
    p.add_argument("--tokenizer-type", default=None, help="default: the first checkpoint's")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="under torchrun: TP x PP x CP processes share each forward")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1,
                   help="split each sequence across processes (long prompts)")
    p.add_argument("--out", default=out, help="output directory")


def lengths_arg(value: str) -> list[int]:
    """``--lengths 1024,2048`` (commas or spaces), sorted, each at least 2."""
    try:
        lengths = sorted({int(v) for v in value.replace(",", " ").split()})
    except ValueError:
        lengths = []
    if not lengths or lengths[0] < 2:
        raise argparse.ArgumentTypeError("give context lengths >= 2, e.g. 1024,2048,4096")
    return lengths


def add_document_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", required=True,
                   help="indexed dataset prefix (…_text_document) or a .jsonl file")
    p.add_argument("--json-key", default="text", help="text field of --data .jsonl")
    p.add_argument("--num-documents", type=int, default=5, help=what)
    p.add_argument("--first-document", type=int, default=0,
                   help="skip documents before this index (held-out part of the data)")


def long_documents_arg(args: argparse.Namespace, min_length: int) -> list:
    """Token tensors of the first ``--num-documents`` documents of ``--data`` (from
    ``--first-document`` on) with at least ``min_length`` tokens."""
    import torch

    if args.data.endswith((".jsonl", ".json")):
        tokenizer = checkpoint_tokenizer(args)
        docs = []
        with open(args.data) as f:
            for i, line in enumerate(f):
                if i < args.first_document:
                    continue
                ids = tokenizer.tokenize(json.loads(line)[args.json_key])
                if len(ids) >= min_length:
                    docs.append(torch.tensor(ids, dtype=torch.long))
                    if len(docs) == args.num_documents:
                        break
        return docs
    from megatron_longctx.data.samples.long_context_dataset import open_indexed
    from megatron_longctx.eval.perplexity import long_documents

    return long_documents(open_indexed(args.data), min_length, args.num_documents,
                          start=args.first_document)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                          context_parallel_size=args.context_parallel_size)


def checkpoint_tokenizer(args: argparse.Namespace):
    """``--tokenizer-type/--tokenizer-model``, else the first checkpoint's ``args.data``."""
    from megatron_longctx.data.tokenization.tokenizers import build_tokenizer
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    kind, model = args.tokenizer_type, args.tokenizer_model
    if kind is None:
        path = resolve_checkpoint(args.load[0])
        if path is None:
            raise SystemExit(f"error: {args.load[0]} holds no checkpoint")
        data = (load_common(path).get("args") or {}).get("data") or {}
        if "tokenizer_type" not in data:
            raise SystemExit(f"error: {args.load[0]} does not record its tokenizer; give "
                             f"--tokenizer-type and --tokenizer-model")
        kind, model = data["tokenizer_type"], data.get("tokenizer_model")
    return build_tokenizer(kind, model)


def label(ckpt: str) -> str:
    """A short name for tables and plot legends."""
    return os.path.basename(ckpt.rstrip("/")) or ckpt
