"""``tools/eval_passkey.py``: passkey retrieval accuracy of one or more checkpoints over a grid
of prompt lengths x needle depths."""

from __future__ import annotations

import argparse
import logging
import os
import time

from tqdm import tqdm

from megatron_longctx.eval.passkey import passkey_accuracy
from megatron_longctx.eval.report import plot_heatmaps, write_table
from megatron_longctx.eval.tool_args import (
    add_checkpoint_args,
    checkpoint_tokenizer,
    label,
    lengths_arg,
    parallel_config,
)

logger = logging.getLogger(__name__)


def _depths(value: str) -> list[float]:
    depths = sorted({float(v) for v in value.replace(",", " ").split()})
    if not depths or depths[0] < 0 or depths[-1] > 1:
        raise argparse.ArgumentTypeError("give depths in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    return depths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=lengths_arg, required=True,
                   help="prompt lengths in tokens, e.g. 1024,2048,4096")
    p.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths as fractions of the filler")
    p.add_argument("--trials", type=int, default=10, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0, help="picks the keys (same for every "
                   "checkpoint)")
    add_checkpoint_args(p, out="eval/passkey")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.trials < 1:
        raise SystemExit("error: --trials must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.distributed as dist

    from megatron_longctx.model import load_model

    tokenizer = checkpoint_tokenizer(args)
    parallel = parallel_config(args)
    results = {}
    for ckpt in args.load:
        model = load_model(ckpt, parallel)
        writer = dist.get_rank() == 0
        cells = len(args.lengths) * len(args.depths)
        started = time.perf_counter()
        with tqdm(total=cells * args.trials, unit="trial", desc=label(ckpt),
                  disable=not writer) as bar:
            def progress(length, depth, correct):
                bar.update(args.trials)
                bar.set_postfix(length=length, depth=depth, correct=f"{correct}/{args.trials}")

            results[ckpt] = passkey_accuracy(model, tokenizer, args.lengths, args.depths,
                                             args.trials, args.seed, progress)
        logger.info("%s: %.1f prompt tokens/s", ckpt, sum(args.lengths) * len(args.depths)
                    * args.trials / (time.perf_counter() - started))
        del model
    if dist.get_rank() != 0:
        return results
    header = ["checkpoint", "length", *[f"depth {d:g}" for d in args.depths], "mean"]
    rows = [[label(c), length, *[by_depth[d] for d in args.depths],
             sum(by_depth.values()) / len(by_depth)]
            for c, r in results.items() for length, by_depth in r.items()]
    meta = {"lengths": args.lengths, "depths": args.depths, "trials": args.trials,
            "seed": args.seed,
            "accuracy": {c: {str(n): {str(d): a for d, a in by.items()} for n, by in r.items()}
                         for c, r in results.items()}}
    paths = write_table(args.out, "passkey", header, rows, meta)
    grids = {label(c): [[r[n][d] for d in args.depths] for n in args.lengths]
             for c, r in results.items()}
    plot_heatmaps(os.path.join(args.out, "passkey.png"), grids, args.lengths, args.depths,
                  "needle depth", "prompt length (tokens)",
                  f"passkey retrieval accuracy ({args.trials} keys per cell)")
    with open(paths["md"]) as f:
        print(f.read())
    return results
