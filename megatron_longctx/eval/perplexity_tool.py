"""``tools/eval_perplexity.py``: perplexity by context length of one or more checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from tqdm import tqdm

from megatron_longctx.eval.perplexity import long_documents, perplexity_by_length
from megatron_longctx.eval.report import plot_lines, write_table
from megatron_longctx.eval.tool_args import (
    add_checkpoint_args,
    checkpoint_tokenizer,
    label,
    lengths_arg,
    parallel_config,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True,
                   help="indexed dataset prefix (…_text_document) or a .jsonl file")
    p.add_argument("--json-key", default="text", help="text field of --data .jsonl")
    p.add_argument("--lengths", type=lengths_arg, required=True, help="e.g. 1024,2048,4096")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens scored per window (default: length - 1)")
    p.add_argument("--num-documents", type=int, default=5,
                   help="documents of at least max(--lengths) tokens to score")
    p.add_argument("--first-document", type=int, default=0,
                   help="skip documents before this index (held-out part of the data)")
    add_checkpoint_args(p, out="eval/perplexity")
    return p


def _documents(args, longest: int) -> list[torch.Tensor]:
    if args.data.endswith((".jsonl", ".json")):
        tokenizer = checkpoint_tokenizer(args)
        docs = []
        with open(args.data) as f:
            for i, line in enumerate(f):
                if i < args.first_document:
                    continue
                ids = tokenizer.tokenize(json.loads(line)[args.json_key])
                if len(ids) >= longest:
                    docs.append(torch.tensor(ids, dtype=torch.long))
                    if len(docs) == args.num_documents:
                        break
        return docs
    from megatron_longctx.data.long_context_dataset import open_indexed

    return long_documents(open_indexed(args.data), longest, args.num_documents,
                          start=args.first_document)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.distributed as dist

    from megatron_longctx.model import load_model

    parallel = parallel_config(args)
    longest = args.lengths[-1]
    docs = _documents(args, longest)
    if not docs:
        raise SystemExit(f"error: {args.data} has no document of {longest} tokens from document "
                         f"{args.first_document} on; lower the largest --lengths")
    if len(docs) < args.num_documents:
        logger.warning("only %d documents have %d tokens", len(docs), longest)
    results = {}
    for ckpt in args.load:
        model = load_model(ckpt, parallel)
        writer = dist.get_rank() == 0  # every rank computes the same logits (TP-gathered)
        total = len(args.lengths) * len(docs) * (longest - 1)
        started = time.perf_counter()
        with tqdm(total=total, unit="tok", desc=label(ckpt),
                  disable=not writer) as bar:
            results[ckpt] = perplexity_by_length(
                model, docs, args.lengths, args.stride,
                progress=lambda length, n: bar.update(n))
        logger.info("%s: %.0f tokens/s", ckpt, total / (time.perf_counter() - started))
        del model
    if dist.get_rank() != 0:
        return results
    header = ["checkpoint", *[str(length) for length in args.lengths]]
    rows = [[label(ckpt), *[r[length]["ppl"] for length in args.lengths]]
            for ckpt, r in results.items()]
    meta = {"data": args.data, "lengths": args.lengths, "stride": args.stride,
            "documents": len(docs), "tokens_per_length": len(docs) * (longest - 1),
            "by_checkpoint": {c: {str(k): v for k, v in r.items()} for c, r in results.items()}}
    paths = write_table(args.out, "perplexity", header, rows, meta)
    series = {label(c): (args.lengths, [r[n]["ppl"] for n in args.lengths])
              for c, r in results.items()}
    plot_lines(os.path.join(args.out, "perplexity.png"), series, "context length (tokens)",
               "perplexity", f"perplexity by context length ({len(docs)} documents)")
    with open(paths["md"]) as f:
        print(f.read())
    return results
