"""RoPE frequency methods: one pure function per ``rope_type``, registered by name.

Each function takes the HF-named ``rope_parameters`` and the rotary dim and returns
``(inv_freq [n_bases, rotary_dim // 2], attention_factor)`` where ``n_bases`` is 1 for shared
bases and the number of KV groups for per-head methods; :func:`compute_inv_freq` expands to one
row per attention head.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

RopeFn = Callable[[dict[str, Any], int], tuple[Tensor, float]]
ROPE_METHODS: dict[str, RopeFn] = {}


def register(name: str):
    def wrap(fn: RopeFn) -> RopeFn:
        ROPE_METHODS[name] = fn
        return fn

    return wrap


def base_inv_freq(base: float | Tensor, dim: int) -> Tensor:
    """``1 / base^(2j/d)`` for ``j = 0..d/2-1``; a tensor of bases gives one row per base."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # [d/2]
    base = torch.as_tensor(base, dtype=torch.float32)
    return 1.0 / (base[..., None] ** exponent)


@register("default")
def default_rope(params: dict[str, Any], dim: int) -> tuple[Tensor, float]:
    """Plain RoPE (Su et al. 2021); ABF (Code Llama) is just a larger ``rope_theta``."""
    return base_inv_freq(float(params["rope_theta"]), dim)[None], 1.0


def compute_inv_freq(
    rope_parameters: dict[str, Any],
    head_dim: int,
    num_attention_heads: int,
    num_query_groups: int,
    rotary_percent: float = 1.0,
) -> tuple[Tensor, float]:
    """Per-head inverse frequencies ``[num_attention_heads, rotary_dim // 2]`` and attention factor."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_METHODS:
        raise ValueError(f"rope_parameters['rope_type']={rope_type!r} is unknown; choose one of "
                         f"{sorted(ROPE_METHODS)}")
    dim = int(head_dim * rotary_percent)
    inv_freq, attention_factor = ROPE_METHODS[rope_type](rope_parameters, dim)
    # rows are per KV group (or one shared row): query heads of a group share their group's row
    heads_per_row = num_attention_heads // inv_freq.shape[0]
    return inv_freq.repeat_interleave(heads_per_row, dim=0), float(attention_factor)
