"""Key/value cache for generation: prefill a prompt once, then decode one token at a time.

Keys are cached *after* our rotary, so each key keeps the rotation of its own position (per-head
HARPE bases and explicit ``position_ids`` included). RoPE types whose frequencies depend on the
sequence length (``dynamic``, LongRoPE's short/long switch) would rotate early keys differently
as the sequence grows; the generation code therefore fixes that length to the final one
(prompt + new tokens) for the prefill and every decode step, which makes decoding equal to one
full forward pass over the final sequence.

Buffers are allocated once at ``max_length`` (no per-token concatenation of a 128k cache). Under
context parallelism the prefill all-gathers keys and values anyway, so every CP rank holds the
whole cache and decodes the (replicated) new token alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer ``[max_length, b, groups, head_dim]`` buffers of this rank's KV heads.

    ``offset``: tokens cached before the current forward pass; the caller advances it after
    each pass (every layer of one pass writes at the same offset).
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.offset = 0
        self._keys: dict[int, Tensor] = {}
        self._values: dict[int, Tensor] = {}

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``key/value [s, b, g, d]`` at ``offset``; every cached key/value so far,
        ``[offset + s, b, g, d]`` (views of the buffers)."""
        end = self.offset + key.shape[0]
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} tokens; this pass needs "
                             f"{end}: allocate it for prompt + new tokens")
        if layer not in self._keys:
            shape = (self.max_length, *key.shape[1:])
            self._keys[layer] = torch.empty(shape, dtype=key.dtype, device=key.device)
            self._values[layer] = torch.empty(shape, dtype=value.dtype, device=value.device)
        self._keys[layer][self.offset:end] = key
        self._values[layer][self.offset:end] = value
        return self._keys[layer][:end], self._values[layer][:end]

    def advance(self, tokens: int) -> None:
        self.offset += tokens
