#!/usr/bin/env python
"""LongRecipe's sample selection: the sentences holding anchor tokens, cut into samples of 30% of
the target window with their position ids recorded as side data, as a new indexed dataset.

Also installed as ``longctx-select-long-samples``. Flags and examples: ``--help``; the code:
megatron_longctx/methods/select_samples_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.methods.select_samples_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
