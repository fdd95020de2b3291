#!/usr/bin/env python
"""Pretrain / continue pretraining a Llama-style model on megatron-core.

Also installed as ``longctx-pretrain``. Flags and examples: ``--help``; the code:
megatron_longctx/training/pretrain_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.training.pretrain_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
