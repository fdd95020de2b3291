"""Greedy decoding with a KV cache: the prompt is prefilled once, then each new token is one
single-token forward pass (no re-forward of the prompt)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from megatron_longctx.model import CausalLM, KVCache


@torch.no_grad()
def greedy_generate(model: CausalLM, prompt: Tensor, max_new_tokens: int,
                    stop_ids: Iterable[int] = ()) -> Tensor:
    """``prompt [b, s]`` -> generated tokens ``[b, n]``, ``n <= max_new_tokens`` (fewer once
    every sequence has produced a stop id). Length-dependent RoPE sees the final length
    ``s + max_new_tokens`` throughout (see :mod:`megatron_longctx.model.kv_cache`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    final = prompt.shape[1] + max_new_tokens
    cache = KVCache(final)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=prompt.device)
    stopped = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    logits = model.next_token_logits(prompt, cache, rope_seq_len=final)  # [b, vocab]
    tokens = []
    while True:
        token = logits.argmax(dim=-1)  # [b]
        tokens.append(token)
        stopped |= torch.isin(token, stops)
        if len(tokens) == max_new_tokens or bool(stopped.all()):
            return torch.stack(tokens, dim=1)
        logits = model.next_token_logits(token[:, None], cache, rope_seq_len=final)
