"""Rotary position embeddings: every extension method, per-head frequencies, explicit positions."""

from megatron_longctx.rope.apply import RotaryTables, apply_rotary
from megatron_longctx.rope.methods import compute_inv_freq
from megatron_longctx.rope.module import RotaryEmbedding

__all__ = ["RotaryEmbedding", "RotaryTables", "apply_rotary", "compute_inv_freq"]
