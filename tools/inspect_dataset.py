#!/usr/bin/env python
"""Check a Megatron indexed dataset and print its statistics, or decode one document.

Also installed as ``longctx-inspect-dataset``. Flags and examples: ``--help``; the code:
megatron_longctx/data/formats/inspect_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.data.formats.inspect_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
