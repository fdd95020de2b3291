"""The rotary module the model holds: frequencies for its TP slice of heads, tables per batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron_longctx.rope.apply import RotaryTables, cos_sin, rotary_angles
from megatron_longctx.rope.methods import compute_inv_freq


class RotaryEmbedding(torch.nn.Module):
    """Builds :class:`RotaryTables` from ``position_ids [b, s]``.

    ``tp_rank``/``tp_size`` select this rank's heads: the only place heads are sliced by TP.
    """

    def __init__(self, rope_parameters: dict[str, Any], head_dim: int, num_attention_heads: int,
                 num_query_groups: int, rotary_percent: float = 1.0,
                 rotary_interleaved: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.rope_parameters = dict(rope_parameters)
        self.interleaved = rotary_interleaved
        inv_freq, self.attention_factor = compute_inv_freq(
            rope_parameters, head_dim, num_attention_heads, num_query_groups, rotary_percent)
        heads_per_group = num_attention_heads // num_query_groups
        q_local = num_attention_heads // tp_size
        inv_q = inv_freq[tp_rank * q_local:(tp_rank + 1) * q_local]  # [h_local, d/2]
        inv_k = inv_q[::heads_per_group]  # [groups_local, d/2]
        self.shared_bases = bool((inv_freq == inv_freq[:1]).all())
        if self.shared_bases:
            inv_q = inv_k = inv_q[:1]  # one row, broadcast over heads
        self.register_buffer("inv_freq_q", inv_q, persistent=False)
        self.register_buffer("inv_freq_k", inv_k, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype = torch.float32) -> RotaryTables:
        cos_q, sin_q = cos_sin(rotary_angles(self.inv_freq_q, position_ids),
                               self.attention_factor, self.interleaved, dtype)
        if self.shared_bases:
            cos_k, sin_k = cos_q, sin_q
        else:
            cos_k, sin_k = cos_sin(rotary_angles(self.inv_freq_k, position_ids),
                                   self.attention_factor, self.interleaved, dtype)
        return RotaryTables(cos_q, sin_q, cos_k, sin_k)
