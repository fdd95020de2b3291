"""torchrun --nproc_per_node 2 methods_worker.py WORK SEQ_LENGTH: converts WORK/hf_a and hf_b
at TP=2 and hf_a at PP=2 (checkpoints saved by two ranks), then runs
tools/analyze_impactful_tokens.py at TP=2 on the TP=2 checkpoints into WORK/impactful_tp2."""

import os
import sys

from megatron_longctx.convert import hf_to_mcore
from megatron_longctx.methods.impactful_tokens_tool import main
from megatron_longctx.parallel.initialize import init_process_group

if __name__ == "__main__":
    work, seq_length = sys.argv[1], sys.argv[2]
    init_process_group()
    hf_to_mcore(os.path.join(work, "hf_a"), os.path.join(work, "ckpt_a_pp2"), pp=2)
    for name in ("a", "b"):
        hf_to_mcore(os.path.join(work, f"hf_{name}"), os.path.join(work, f"ckpt_{name}_tp2"), tp=2)
    main(["--base", os.path.join(work, "ckpt_a_tp2"), "--extended",
          os.path.join(work, "ckpt_b_tp2"), "--data", os.path.join(work, "docs_text_document"),
          "--seq-length", seq_length, "--tensor-model-parallel-size", "2",
          "--out", os.path.join(work, "impactful_tp2")])
