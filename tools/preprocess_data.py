#!/usr/bin/env python
"""Tokenize JSONL / JSONL.gz / JSONL.zst / Parquet files into Megatron indexed datasets.

Also installed as ``longctx-preprocess-data``. Flags and examples: ``--help``; the code:
megatron_longctx/data/preprocessing/preprocess_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.data.preprocessing.preprocess_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
