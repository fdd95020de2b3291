"""torchrun --nproc_per_node 2 generation_worker.py CHECKPOINTS_JSON OUT: greedy generation
logits/tokens and token NLLs of each checkpoint at TP=2, then at CP=2."""

import json
import sys

import torch
import torch.distributed as dist

from megatron_longctx.config import ParallelConfig
from megatron_longctx.eval import token_nll
from megatron_longctx.eval.generation import greedy_generate
from megatron_longctx.model import KVCache, load_model


def prompts(batch, length, seed):
    return torch.randint(0, 258, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, prompt, new):
    final = prompt.shape[1] + new
    tokens = greedy_generate(model, prompt, new)
    cache = KVCache(final)
    logits = [model.next_token_logits(prompt, cache, final)]
    for i in range(new - 1):
        logits.append(model.next_token_logits(tokens[:, i:i + 1], cache, final))
    return tokens, torch.stack(logits, dim=1)


if __name__ == "__main__":
    checkpoints, out = json.loads(sys.argv[1]), sys.argv[2]
    results = {}
    for name, layout in (("tp2", ParallelConfig(tensor_model_parallel_size=2)),
                         ("cp2", ParallelConfig(context_parallel_size=2))):
        results[name] = {}
        for rope, ckpt in checkpoints.items():
            model = load_model(ckpt, layout)
            tokens, logits = generate(model, prompts(2, 37, seed=5), 9)
            nll = token_nll(model, prompts(2, 45, seed=6))
            results[name][rope] = {"tokens": tokens.tolist(), "logits": logits.tolist(),
                                   "nll": nll.tolist()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
