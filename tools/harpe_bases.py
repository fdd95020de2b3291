#!/usr/bin/env python
"""Print the HARPE RoPE base set for given settings (one base per KV group / head).

Also installed as ``longctx-harpe-bases``. Flags and examples: ``--help``; the code:
megatron_longctx/rope/harpe_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.rope.harpe_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
