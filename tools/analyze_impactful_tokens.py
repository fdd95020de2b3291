#!/usr/bin/env python
"""LongRecipe's impactful-token analysis: per-token gain of a context-extended model over its
base on the same long documents, the top 20% per document, their token classes (markdown, PNG)
and the anchor-token set for the sample selection.

Also installed as ``longctx-analyze-impactful-tokens``. Flags and examples: ``--help``; the
code: megatron_longctx/methods/impactful_tokens_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.methods.impactful_tokens_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
