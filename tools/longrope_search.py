#!/usr/bin/env python
"""LongRoPE's evolutionary search of per-pair RoPE rescale factors and n-hat on one of our
checkpoints; writes the rope_parameters block training, evaluation and conversion accept.

Also installed as ``longctx-longrope-search``. Flags and examples: ``--help``; the code:
megatron_longctx/methods/longrope_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.methods.longrope_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
