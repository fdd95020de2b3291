#!/usr/bin/env python
"""Passkey retrieval accuracy of one or more checkpoints over prompt lengths x needle depths (greedy
decoding with a KV cache), as a table (markdown, CSV, results.json) and a heatmap PNG.

Also installed as ``longctx-eval-passkey``. Flags and examples: ``--help``; the code:
megatron_longctx/eval/passkey_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.eval.passkey_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
