#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer on JSONL / Parquet documents.

Also installed as ``longctx-train-tokenizer``. Flags and examples: ``--help``; the code:
megatron_longctx/data/tokenization/train_tokenizer_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.data.tokenization.train_tokenizer_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
