#!/usr/bin/env python
"""Concatenate Megatron indexed datasets (.bin/.idx) into one, streaming.

Also installed as ``longctx-merge-datasets``. Flags and examples: ``--help``; the code:
megatron_longctx/data/formats/merge_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.data.formats.merge_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
