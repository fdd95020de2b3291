"""torchrun --nproc_per_node 2 perplexity_worker.py CKPT DATA OUT: tools/eval_perplexity.py at
TP=2, then PP=2, then CP=2 (windows of 32 and 64 tokens: 32 - 1 scored per window, split
unevenly, so CP pads)."""

import sys

from megatron_longctx.eval.perplexity_tool import main

if __name__ == "__main__":
    ckpt, data, out = sys.argv[1:4]
    for flag, name in (("--tensor-model-parallel-size", "tp2"),
                       ("--pipeline-model-parallel-size", "pp2"),
                       ("--context-parallel-size", "cp2")):
        main(["--load", ckpt, "--data", data, "--lengths", "32,64", "--num-documents", "2",
              flag, "2", "--out", f"{out}/{name}"])
