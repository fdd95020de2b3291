#!/usr/bin/env python
"""Perplexity by context length of one or more checkpoints (sliding window), as a table (markdown,
CSV, results.json) and a PNG plot.

Also installed as ``longctx-eval-perplexity``. Flags and examples: ``--help``; the code:
megatron_longctx/eval/perplexity_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.eval.perplexity_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
