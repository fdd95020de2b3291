"""Apply rotary embeddings from explicit positions, with per-head frequencies.

Tables are computed once per forward pass (per micro-batch) in float32 and shared by every layer;
the attention factor multiplies cos and sin (so attention logits scale by its square).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RotaryTables:
    """cos/sin for queries and keys, ``[s, b, heads or 1, rotary_dim]`` in the compute dtype.

    Shared-base methods keep a head axis of 1 (broadcast); per-head methods (HARPE) hold the
    local query heads in ``*_q`` and the local KV groups in ``*_k``.
    """

    cos_q: Tensor
    sin_q: Tensor
    cos_k: Tensor
    sin_k: Tensor


def rotary_angles(inv_freq: Tensor, position_ids: Tensor) -> Tensor:
    """Angles ``position * inv_freq`` in float32.

    inv_freq: ``[h, d/2]``; position_ids: ``[b, s]`` (any integers: PoSE-style gaps welcome).
    Returns ``[s, b, h, d/2]``.
    """
    pos = position_ids.to(torch.float32).transpose(0, 1)  # [s, b]
    return pos[:, :, None, None] * inv_freq.to(torch.float32)[None, None]  # [s, b, h, d/2]


def cos_sin(angles: Tensor, attention_factor: float | Tensor, interleaved: bool,
            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[s, b, h, d]`` from angles ``[s, b, h, d/2]``.

    ``attention_factor`` is a float, or a tensor broadcastable to ``[s, b, 1, 1]`` when it varies
    per token (LongRoPE's first n-hat positions are unscaled).
    """
    if interleaved:
        angles = angles.repeat_interleave(2, dim=-1)  # pairs (x0, x1), (x2, x3), ...
    else:
        angles = torch.cat((angles, angles), dim=-1)  # pairs (x_j, x_{j + d/2})
    cos, sin = angles.cos(), angles.sin()
    if not (isinstance(attention_factor, float) and attention_factor == 1.0):
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``t`` ``[s, b, h, d]``; pass the rest."""
    rot_dim = cos.shape[-1]
    if rot_dim == t.shape[-1]:
        return t * cos + rotate_half(t, interleaved) * sin
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    t_rot = t_rot * cos + rotate_half(t_rot, interleaved) * sin
    return torch.cat((t_rot, t_pass), dim=-1)
