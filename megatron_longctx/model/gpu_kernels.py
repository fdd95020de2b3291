"""Optional GPU kernels, detected in one place.

Transformer Engine's attention (cuDNN / flash fused attention, with its own context-parallel
communication: ``--cp-comm-type p2p|all_gather|a2a|a2a+p2p``) is used for plain causal attention
when TE imports and CUDA is present, as in NVIDIA's NGC images. Everything else, and every CPU
run, uses torch's flash kernels (``scaled_dot_product_attention`` and the blockwise
document/context-parallel path), so nothing here is imported or warned about on CPU.

Apple's Cut Cross Entropy, when installed, computes the chunked loss's TP=1 bf16 case
(:mod:`megatron_longctx.model.chunked_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def transformer_engine_attention() -> type | None:
    """megatron-core's ``TEDotProductAttention`` when usable here, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
    except ImportError:
        return None
    return TEDotProductAttention if HAVE_TE else None


@functools.cache
def cut_cross_entropy() -> Callable | None:
    """``cut_cross_entropy.linear_cross_entropy`` (Triton kernels) when usable here, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return linear_cross_entropy
