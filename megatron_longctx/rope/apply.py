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
    """cos/sin for queries and keys, ``[s, b, heads or 1, rotary_dim / 2]`` in the compute dtype.

    One value per frequency pair (the two members of a pair share it). Shared-base methods keep
    a head axis of 1 (broadcast); per-head methods (HARPE) hold the local query heads in ``*_q``
    and the local KV groups in ``*_k``.
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


def cos_sin(angles: Tensor, attention_factor: float | Tensor, dtype: torch.dtype
            ) -> tuple[Tensor, Tensor]:
    """cos/sin tables from angles ``[s, b, h, d/2]``, scaled by the attention factor.

    ``attention_factor`` is a float, or a tensor broadcastable to ``[s, b, 1, 1]`` when it varies
    per token (LongRoPE's first n-hat positions are unscaled).
    """
    cos, sin = angles.cos(), angles.sin()
    if not (isinstance(attention_factor, float) and attention_factor == 1.0):
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def _pairs(t: Tensor, half: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The two members of each rotated pair: (x_j, x_{j+d/2}) or (x_{2j}, x_{2j+1})."""
    if interleaved:
        return t[..., 0:2 * half:2], t[..., 1:2 * half:2]
    return t[..., :half], t[..., half:2 * half]


def _rotate(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` written straight into the output."""
    half = cos.shape[-1]
    out = torch.empty_like(t)
    x1, x2 = _pairs(t, half, interleaved)
    o1, o2 = _pairs(out, half, interleaved)
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    if 2 * half < t.shape[-1]:  # partial rotary: the rest passes through
        out[..., 2 * half:] = t[..., 2 * half:]
    return out


class _ApplyRotary(torch.autograd.Function):
    """Rotation with a hand-written backward: the gradient is the inverse rotation (sin -> -sin),
    so only the shared cos/sin tables are kept for backward, never the rotated activations."""

    @staticmethod
    def forward(ctx, t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _rotate(t, cos, sin, interleaved)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, -sin, ctx.interleaved), None, None, None


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``t`` ``[s, b, h, d]``; pass the rest.

    ``cos``/``sin`` ``[s, b, h or 1, d_rot/2]`` broadcast over heads. Gradients flow to ``t``
    only (the tables are functions of positions, not of parameters).
    """
    return _ApplyRotary.apply(t, cos, sin, interleaved)
