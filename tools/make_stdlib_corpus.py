#!/usr/bin/env python
"""Write Python's standard-library sources as a JSONL corpus (one {"text": ...} per file, or per
top-level package with --by-package: long documents for long-context work).

Also installed as ``longctx-make-stdlib-corpus``. Flags and examples: ``--help``; the code:
megatron_longctx/data/corpora/stdlib_corpus_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.data.corpora.stdlib_corpus_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
