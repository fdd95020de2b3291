#!/usr/bin/env python
"""Pretrain / continue pretraining a Llama-style model on megatron-core.

Example (2 processes, TP=2, on CPU or GPU):
    torchrun --nproc_per_node 2 tools/pretrain.py --tensor-model-parallel-size 2 \
        --num-layers 4 --hidden-size 128 --num-attention-heads 8 --num-query-groups 2 \
        --seq-length 256 --micro-batch-size 2 --global-batch-size 8 --train-iters 50 \
        --rotary-base 500000
A recipe with ``stages:`` (``--config examples/llama2_7b_abf_3stage.yaml``) runs its stages in
order; rerunning the same command skips finished stages and resumes the unfinished one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.arguments import parse_stages  # noqa: E402
from megatron_longctx.training.run import main  # noqa: E402

if __name__ == "__main__":
    try:
        stages, args = parse_stages(description=__doc__)
    except ValueError as err:  # a malformed recipe
        raise SystemExit(f"error: {err}") from None
    main(stages, dry_run=getattr(args, "dry_run", False))
