"""The one scorer (DECISIONS 8): next-token negative log-likelihood of a causal LM, and
perplexity from it. Eval, the LongRoPE objective and the impactful-token analysis use it.

Logits ``[b, s, vocab]`` of a long window are large (a 128k window with a 128k vocabulary is
64 GiB in fp32): the log-softmax runs over ``chunk`` positions at a time, in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def token_nll(model, input_ids: Tensor, position_ids: Tensor | None = None,
              chunk: int = 4096) -> Tensor:
    """``-log p(x_{t+1} | x_{<=t})`` for ``t = 0 .. s-2``: ``[b, s - 1]`` fp32.

    ``model(input_ids, position_ids)`` returns logits ``[b, s, vocab]`` (e.g.
    :func:`megatron_longctx.model.load_model`)."""
    logits = model(input_ids, position_ids)  # [b, s, vocab]
    targets = input_ids[:, 1:]
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[1], chunk):
        end = min(start + chunk, targets.shape[1])
        piece = logits[:, start:end].float().log_softmax(dim=-1)  # [b, c, vocab]
        out[:, start:end] = -piece.gather(-1, targets[:, start:end, None]).squeeze(-1)
    return out


def perplexity(nll_sum: float, count: int) -> float:
    """``exp(mean NLL)``; ``inf`` past float range, ``nan`` for no tokens."""
    if count <= 0:
        return math.nan
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else math.inf
