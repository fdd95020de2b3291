#!/usr/bin/env python
"""RULER (the tasks that need no external data: NIAH x8, variable tracking, common and frequent
words extraction) for one or more checkpoints: a task x length table (markdown, CSV,
results.json), the average, the effective length, and a PNG plot.

Also installed as ``longctx-eval-ruler``. Flags and examples: ``--help``; the code:
megatron_longctx/eval/ruler_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.eval.ruler_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
