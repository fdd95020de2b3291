#!/usr/bin/env python
"""Write a context-extension report (markdown with tables, plots and a reading of the numbers) from
the outputs of tools/eval_perplexity.py and tools/eval_passkey.py.

Also installed as ``longctx-extension-report``. Flags and examples: ``--help``; the code:
megatron_longctx/eval/extension_report_tool.py.
"""

import sys

from megatron_longctx.console import exit_status
from megatron_longctx.eval.extension_report_tool import main

if __name__ == "__main__":
    sys.exit(exit_status(main()))
