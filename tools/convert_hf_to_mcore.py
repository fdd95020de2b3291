#!/usr/bin/env python
"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint to a megatron_longctx checkpoint.

Also installed as ``longctx-convert-hf-to-mcore``. Flags and examples: ``--help``; the code:
megatron_longctx/convert/hf_to_mcore_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.convert.hf_to_mcore_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
