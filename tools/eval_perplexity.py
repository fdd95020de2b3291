#!/usr/bin/env python
"""Perplexity by context length of one or more checkpoints (sliding window), as a table
(markdown, CSV, results.json) and a PNG plot.

    python tools/eval_perplexity.py --load runs/base runs/yarn --data data/valid_text_document \
        --lengths 512,1024,2048,4096 --num-documents 5 --out eval/ppl
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.eval.perplexity_tool import main  # noqa: E402

if __name__ == "__main__":
    main()
