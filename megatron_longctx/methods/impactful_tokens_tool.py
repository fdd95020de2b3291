"""``tools/analyze_impactful_tokens.py``: LongRecipe's impactful-token analysis of a base and a
context-extended checkpoint on the same long documents, in one process or under torchrun
(TP/PP/CP share each forward; every rank gets the same numbers, rank 0 writes them).

    python tools/analyze_impactful_tokens.py --base runs/base --extended runs/yarn \\
        --data data/heldout_text_document --seq-length 8192 --num-documents 20 \\
        --out impactful/yarn
    torchrun --nproc_per_node 8 tools/analyze_impactful_tokens.py ... \\
        --tensor-model-parallel-size 8

Each document is cut to its first ``--seq-length`` tokens; per token
``Δ = log p_extended(gold) − log p_base(gold)``; the ``--fraction`` (20%) of each document's
tokens with the largest Δ are kept. ``--out`` gets ``token_classes.md``/``.csv``/``.png`` and
``results.json`` (class shares among the kept tokens vs all tokens, and the top anchors),
``anchor_tokens.json`` (the anchor-token ids with counts, for the sample selection) and
``deltas.npz`` (each document's tokens and Δ).
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
from tqdm import tqdm

from megatron_longctx.eval.report import plot_bars, write_table
from megatron_longctx.eval.tool_args import (
    add_document_args,
    checkpoint_tokenizer,
    label,
    long_documents_arg,
    parallel_config,
)
from megatron_longctx.methods.impactful_tokens import (
    CLASSES,
    ImpactfulTokens,
    deltas,
    document_nll,
    save_anchor_tokens,
    token_class,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="checkpoint of the base (short-context) model")
    p.add_argument("--extended", required=True, help="checkpoint of the context-extended model")
    p.add_argument("--seq-length", type=int, required=True,
                   help="tokens per document scored (documents shorter are skipped)")
    p.add_argument("--fraction", type=float, default=0.2,
                   help="share of each document's tokens kept, by largest Δ")
    p.add_argument("--top-anchors", type=int, default=30,
                   help="anchor tokens listed in the report (the JSON holds all)")
    add_document_args(p, "documents of at least --seq-length tokens to score")
    p.add_argument("--tokenizer-type", default=None, help="default: the base checkpoint's")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="under torchrun: TP x PP x CP processes share each forward")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1,
                   help="split each sequence across processes (long documents)")
    p.add_argument("--out", default="impactful_tokens", help="output directory")
    return p


def _check_pair(base: str, extended: str) -> None:
    """Both checkpoints exist and share one vocabulary (else Δ compares different tokens)."""
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    vocab = {}
    for ckpt in (base, extended):
        path = resolve_checkpoint(ckpt)
        if path is None:
            raise SystemExit(f"error: {ckpt} holds no checkpoint")
        vocab[ckpt] = ((load_common(path).get("args") or {}).get("model") or {}).get("vocab_size")
    if vocab[base] != vocab[extended]:
        raise SystemExit(f"error: --base has vocab_size {vocab[base]}, --extended "
                         f"{vocab[extended]}; compare two models with one tokenizer")


def _nll(ckpt: str, parallel, docs) -> list:
    import torch.distributed as dist

    from megatron_longctx.model import load_model

    model = load_model(ckpt, parallel)
    nll = []
    for doc in tqdm(docs, unit="doc", desc=label(ckpt), disable=dist.get_rank() != 0):
        nll += document_nll(model, [doc])
    del model
    return nll


def _report(args, analysis: ImpactfulTokens, decode, docs, delta) -> dict:
    shares = analysis.class_shares(lambda token: token_class(decode(token)))
    anchors = analysis.anchors(decode)
    meta = {"base": args.base, "extended": args.extended, "data": args.data,
            "seq_length": args.seq_length, "fraction": args.fraction, "documents": len(docs),
            "tokens_scored": sum(analysis.total.values()),
            "tokens_kept": sum(analysis.kept.values())}
    header = ["class", "share of kept", "share of all", "enrichment", "kept", "all"]
    rows = [[name, s["kept_share"], s["all_share"], s["enrichment"], s["kept"], s["all"]]
            for name, s in shares.items()]
    paths = write_table(args.out, "token_classes", header, rows,
                        {**meta, "classes": shares, "top_anchors": anchors[:args.top_anchors]})
    lines = ["", f"Top {min(args.top_anchors, len(anchors))} anchor tokens (of {len(anchors)}):",
             "", "| id | token | class | kept | scored | kept rate | mean Δ |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {a['id']} | {a['text']!r} | {a['class']} | {a['count']} | {a['total']} | "
              f"{a['kept_rate']:.2f} | {a['mean_delta']:.3f} |" for a in anchors[:args.top_anchors]]
    with open(paths["md"], "a") as f:
        f.write("\n".join(lines) + "\n")
    plot_bars(os.path.join(args.out, "token_classes.png"),
              {"kept (top Δ)": [shares[c]["kept_share"] for c in CLASSES],
               "all tokens": [shares[c]["all_share"] for c in CLASSES]},
              list(CLASSES), "share of tokens",
              f"token classes of the top {args.fraction:.0%} Δ: {label(args.extended)} vs "
              f"{label(args.base)} ({len(docs)} docs x {args.seq_length} tokens)")
    save_anchor_tokens(os.path.join(args.out, "anchor_tokens.json"), anchors, meta)
    np.savez(os.path.join(args.out, "deltas.npz"),
             **{f"tokens_{i}": d.numpy() for i, d in enumerate(docs)},
             **{f"delta_{i}": d.numpy() for i, d in enumerate(delta)})
    with open(paths["md"]) as f:
        print(f.read())
    return {"classes": shares, "anchors": anchors, **meta}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.seq_length < 2:
        raise SystemExit("error: --seq-length must be >= 2 (a token and its context)")
    if not 0.0 < args.fraction <= 1.0:
        raise SystemExit(f"error: --fraction must be in (0, 1], got {args.fraction}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.distributed as dist

    args.load = [args.base, args.extended]  # the shared helpers take the tokenizer from load[0]
    _check_pair(args.base, args.extended)
    tokenizer = checkpoint_tokenizer(args)
    docs = [d[:args.seq_length] for d in long_documents_arg(args, args.seq_length)]
    if not docs:
        raise SystemExit(f"error: {args.data} has no document of {args.seq_length} tokens from "
                         f"document {args.first_document} on; lower --seq-length")
    if len(docs) < args.num_documents:
        logger.warning("only %d documents have %d tokens", len(docs), args.seq_length)
    parallel = parallel_config(args)
    nll_base = _nll(args.base, parallel, docs)
    nll_extended = _nll(args.extended, parallel, docs)
    delta = deltas(nll_base, nll_extended)
    analysis = ImpactfulTokens(args.fraction)
    for doc, d in zip(docs, delta):
        analysis.add(doc, d)
    results = {"deltas": delta}
    if dist.get_rank() == 0:  # every rank holds the same (TP-gathered) numbers
        cache: dict[int, str] = {}

        def decode(token: int) -> str:
            if token not in cache:
                cache[token] = tokenizer.detokenize([token])
            return cache[token]

        results.update(_report(args, analysis, decode, docs, delta))
    return results
