#!/usr/bin/env python
"""Export a megatron_longctx checkpoint as a Hugging Face model (sharded safetensors).

Also installed as ``longctx-convert-mcore-to-hf``. Flags and examples: ``--help``; the code:
megatron_longctx/convert/mcore_to_hf_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.convert.mcore_to_hf_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
