"""``tools/merge_checkpoints.py``: a weighted average of checkpoints of one model, streamed one
layer at a time, written as a weights-only checkpoint that loads at any layout.

LongRecipe's last step (a low-lr replay stage on general data, then the merge
``θ = 0.5·θ_extended + 0.5·θ_replayed``; README, *LongRecipe: replay and merging*)::

    python tools/merge_checkpoints.py --load runs/extended runs/replayed --weights 0.5 0.5 \\
        --save runs/merged

Inputs may have been saved at any TP/PP layout; the result is padded for
``--tensor-model-parallel-size`` (Megatron-LM's vocabulary padding) and records that layout.
Inputs whose RoPE settings differ are refused unless ``--allow-rope-mismatch``; the result
carries the first input's metadata (args, tokenizer files).
"""

from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

from megatron_longctx.convert.hf_to_mcore_tool import bound_heap_memory
from megatron_longctx.methods.merge import MergeError, merge_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", nargs="+", required=True,
                   help="checkpoints to merge (save roots: their latest; or iter_* directories)")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per --load entry, summing to 1 (default: uniform)")
    p.add_argument("--normalize", action="store_true",
                   help="divide --weights by their sum instead of requiring it to be 1")
    p.add_argument("--save", required=True, help="output directory (a new checkpoint root)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="layout the result is written for (vocabulary padding, recorded args)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--read-chunk-mib", type=float, default=64,
                   help="read each input this many MiB at a time (peak memory: about 10x)")
    p.add_argument("--allow-rope-mismatch", action="store_true",
                   help="merge checkpoints trained with different RoPE settings (the result "
                        "keeps the first one's)")
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if args.read_chunk_mib <= 0:
        raise SystemExit(f"error: --read-chunk-mib must be > 0, got {args.read_chunk_mib}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bound_heap_memory()  # each piece's temporaries go back to the system when freed
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, unit="tensor", desc="merge")  # once inputs are checked
        bar.update(done - bar.n)

    try:
        path = merge_checkpoints(
            args.load, args.save, args.weights, normalize=args.normalize,
            tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
            allow_rope_mismatch=args.allow_rope_mismatch,
            chunk_bytes=int(args.read_chunk_mib * 2**20), progress=progress)
    except MergeError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if bar is not None:
            bar.close()
    print(path)
    return path
