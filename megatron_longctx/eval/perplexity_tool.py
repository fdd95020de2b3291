"""``tools/eval_perplexity.py``: perplexity by context length of one or more checkpoints."""

from __future__ import annotations

import argparse
import logging
import os
import time

from tqdm import tqdm

from megatron_longctx.eval.perplexity import perplexity_by_length
from megatron_longctx.eval.report import plot_lines, write_table
from megatron_longctx.eval.tool_args import (
    add_checkpoint_args,
    add_document_args,
    label,
    lengths_arg,
    long_documents_arg,
    parallel_config,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=lengths_arg, required=True, help="e.g. 1024,2048,4096")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens scored per window (default: length - 1)")
    add_document_args(p, "documents of at least max(--lengths) tokens to score")
    add_checkpoint_args(p, out="eval/perplexity")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.distributed as dist

    from megatron_longctx.model import load_model

    parallel = parallel_config(args)
    longest = args.lengths[-1]
    docs = long_documents_arg(args, longest)
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
