#!/usr/bin/env python
"""A weighted average of checkpoints of one model (LongRecipe's merge after replay, model soups),
streamed one layer at a time; inputs at any TP/PP layout, the result written for a chosen one.

Also installed as ``longctx-merge-checkpoints``. Flags and examples: ``--help``; the code:
megatron_longctx/methods/merge_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.methods.merge_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
