#!/usr/bin/env python
"""Write synthetic retrieval documents (a pass key stated early, recalled at the end) as JSONL, to
mix a small share into pretraining so that passkey retrieval is learnable by small models.

Also installed as ``longctx-make-retrieval-corpus``. Flags and examples: ``--help``; the code:
megatron_longctx/data/corpora/retrieval_corpus_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.data.corpora.retrieval_corpus_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
