"""The rotary module a model holds: frequencies for its TP slice of heads, tables per batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron_longctx.rope.apply import RotaryTables, cos_sin, rotary_angles
from megatron_longctx.rope.methods import LENGTH_DEPENDENT, base_inv_freq, compute_inv_freq


class RotaryEmbedding(torch.nn.Module):
    """Builds :class:`RotaryTables` from ``position_ids [b, s]`` for this rank's heads.

    * ``tp_rank``/``tp_size`` select this rank's query heads and KV groups: the only place heads
      are sliced by TP.
    * ``dynamic`` and ``longrope`` depend on the current sequence length, taken as
      ``max(position_ids) + 1`` unless ``seq_len`` is given (under context parallelism the
      caller passes the global length, since a rank holds only some chunks).
    * LongRoPE's ``longrope_start_tokens`` (n-hat): positions below it keep the unscaled angles
      and no attention factor.
    """

    def __init__(self, rope_parameters: dict[str, Any], head_dim: int, num_attention_heads: int,
                 num_query_groups: int, rotary_percent: float = 1.0,
                 max_position_embeddings: int | None = None,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.rope_parameters = dict(rope_parameters)
        self.rope_type = self.rope_parameters.get("rope_type", "default")
        self.head_dim, self.rotary_percent = head_dim, rotary_percent
        self.num_attention_heads, self.num_query_groups = num_attention_heads, num_query_groups
        self.max_position_embeddings = max_position_embeddings
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.start_tokens = int(self.rope_parameters.get("longrope_start_tokens", 0))
        # validates the parameters now, before any training work
        inv_freq, self.attention_factor = self._inv_freq(seq_len=None)
        self.per_head = not bool((inv_freq == inv_freq[:1]).all())
        inv_q, inv_k = self._local_rows(inv_freq)
        self.register_buffer("inv_freq_q", inv_q, persistent=False)
        self.register_buffer("inv_freq_k", inv_k, persistent=False)
        self._by_length: dict[int, tuple[Tensor, Tensor, float]] = {}

    def _inv_freq(self, seq_len: int | None) -> tuple[Tensor, float]:
        return compute_inv_freq(self.rope_parameters, self.head_dim, self.num_attention_heads,
                                self.num_query_groups, self.rotary_percent, seq_len=seq_len,
                                max_position_embeddings=self.max_position_embeddings)

    def _local_rows(self, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        """``[heads, d/2]`` -> this TP rank's query rows and KV-group rows (1 row if shared)."""
        if not self.per_head:
            return inv_freq[:1], inv_freq[:1]
        q_local = self.num_attention_heads // self.tp_size
        inv_q = inv_freq[self.tp_rank * q_local:(self.tp_rank + 1) * q_local]
        heads_per_group = self.num_attention_heads // self.num_query_groups
        return inv_q, inv_q[::heads_per_group]

    def frequencies(self, seq_len: int) -> tuple[Tensor, Tensor, float]:
        """Local (query rows, key rows, attention factor) for a sequence of ``seq_len``."""
        if self.rope_type not in LENGTH_DEPENDENT:
            return self.inv_freq_q, self.inv_freq_k, self.attention_factor
        # validated once in __init__; a few lengths per run, so keep their results
        if seq_len not in self._by_length:
            if len(self._by_length) >= 16:
                self._by_length.clear()
            inv_freq, factor = self._inv_freq(seq_len)
            self._by_length[seq_len] = (*self._local_rows(inv_freq.to(self.inv_freq_q.device)),
                                        factor)
        return self._by_length[seq_len]

    def _tables(self, inv_freq: Tensor, position_ids: Tensor, factor: float,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = rotary_angles(inv_freq, position_ids)  # [s, b, h, d/2]
        if self.start_tokens <= 0:
            return cos_sin(angles, factor, dtype)
        theta = self.rope_parameters.get("rope_theta", 10000.0)  # LongRopeParams' default
        dim = inv_freq.shape[-1] * 2
        unscaled = rotary_angles(base_inv_freq(theta, dim).to(inv_freq.device)[None], position_ids)
        early = (position_ids < self.start_tokens).transpose(0, 1)[:, :, None, None]  # [s,b,1,1]
        angles = torch.where(early, unscaled, angles)
        per_token_factor = torch.where(early, 1.0, factor).to(torch.float32)
        return cos_sin(angles, per_token_factor, dtype)

    def forward(self, position_ids: Tensor, dtype: torch.dtype = torch.float32,
                seq_len: int | None = None) -> RotaryTables:
        if seq_len is None and self.rope_type in LENGTH_DEPENDENT:
            seq_len = int(position_ids.max()) + 1
        inv_q, inv_k, factor = self.frequencies(seq_len or 0)
        cos_q, sin_q = self._tables(inv_q, position_ids, factor, dtype)
        if not self.per_head:
            return RotaryTables(cos_q, sin_q, cos_q, sin_q)
        cos_k, sin_k = self._tables(inv_k, position_ids, factor, dtype)
        return RotaryTables(cos_q, sin_q, cos_k, sin_k)
