#!/usr/bin/env python
"""List every valid TP/PP/CP/DP layout of a recipe with its memory per GPU and step time.

    python tools/plan_layout.py --model examples/llama2_7b_harpe_128k.yaml --seq-length 131072 \
        --gpus 32 --gpu-memory 80 [--micro-batch-size 1 2] [--explain]

Also installed as ``longctx-plan-layout``; the code: megatron_longctx/training/planner.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.training.planner import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
