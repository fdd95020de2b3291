#!/usr/bin/env python
"""Passkey retrieval accuracy of one or more checkpoints over prompt lengths x needle depths
(greedy decoding with a KV cache), as a table (markdown, CSV, results.json) and a heatmap PNG.

    python tools/eval_passkey.py --load runs/base runs/yarn --lengths 1024,2048,4096 \
        --depths 0,0.25,0.5,0.75,1 --trials 10 --out eval/passkey
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.eval.passkey_tool import main  # noqa: E402

if __name__ == "__main__":
    main()
