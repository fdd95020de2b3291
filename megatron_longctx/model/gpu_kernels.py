"""Optional GPU kernels, detected in one place.

Transformer Engine's attention (cuDNN / flash fused attention, with its own context-parallel
communication: ``--cp-comm-type p2p|all_gather|a2a|a2a+p2p``) is used for plain causal attention
when TE imports and CUDA is present, as in NVIDIA's NGC images; its layers (fused RMSNorm + QKV
and RMSNorm + fc1, row-parallel linears) then fill the layer spec (``--transformer-impl
transformer_engine``, the default there: :func:`transformer_engine_spec_provider`). Everything
else, and every CPU run, uses torch's flash kernels (``scaled_dot_product_attention`` and the
blockwise document/context-parallel path), so nothing here is imported or warned about on CPU.

Without Transformer Engine, CUDA runs document-masked and context-parallel attention on torch's
FlexAttention (:func:`uses_flex_attention`).

Apple's Cut Cross Entropy, when installed, computes the chunked loss's TP=1 bf16 case
(:mod:`megatron_longctx.model.chunked_loss`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def transformer_engine_attention() -> type | None:
    """megatron-core's ``TEDotProductAttention`` when usable here, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
    except ImportError:
        return None
    return TEDotProductAttention if HAVE_TE else None


def transformer_engine_core_attention(config) -> type | None:
    """TE's attention class when a model of this megatron-core ``config`` attends with it:
    ``--transformer-impl transformer_engine`` (set only where TE is usable, ``model.gpt``) and
    ``--attention-backend`` other than ``local`` and our ``flex``; else None."""
    from megatron.core.transformer.enums import AttnBackend

    if (config.transformer_impl != "transformer_engine"
            or config.attention_backend == AttnBackend.local
            or getattr(config, "flex_attention_backend", False)):
        return None
    return transformer_engine_attention()


def transformer_engine_spec_provider():
    """megatron-core's ``TESpecProvider`` (which TE module fills each layer slot, as its
    ``get_gpt_layer_with_transformer_engine_spec`` uses it) when TE is usable here, else None."""
    if transformer_engine_attention() is None:
        return None
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def gradient_accumulation_fusion_available() -> bool:
    """Whether megatron-core can fuse weight-gradient accumulation into the GEMMs
    (``gradient_accumulation_fusion``: the wgrad GEMM adds into the fp32 ``main_grad`` of its
    DDP buffer). Its local linears, the output layer among them whatever the spec, need apex's
    ``fused_weight_gradient_mlp_cuda``: megatron-core's own check, which its
    ``ColumnParallelLinear`` raises on. TE's linears fuse it natively."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


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


_logged_fallback = False


def use_transformer_engine(transformer_impl: str | None) -> bool:
    """Whether ``--transformer-impl`` (None: Transformer Engine where usable) gets TE here.

    An explicit ``transformer_engine`` where TE cannot run (no CUDA or no TE) falls back to the
    local implementation, said once in the log.
    """
    if transformer_impl == "local":
        return False
    usable = transformer_engine_attention() is not None
    global _logged_fallback
    if transformer_impl == "transformer_engine" and not usable and not _logged_fallback:
        logger.info(
            "--transformer-impl transformer_engine: Transformer Engine is not usable here (%s); "
            "using the local implementation", "no CUDA" if not torch.cuda.is_available()
            else "not installed")
        _logged_fallback = True
    return usable


def uses_flex_attention(attention_backend: str, transformer_engine: bool) -> bool:
    """Whether document-masked and context-parallel attention (and, with ``flex``, all
    attention) runs on FlexAttention: ``--attention-backend flex``, or ``auto`` on CUDA
    without Transformer Engine (where the blockwise flash path would need bf16 and loop over
    blocks in Python)."""
    from megatron_longctx.model.flex_attention import flex_attention_available

    if attention_backend == "flex":
        return True
    return (attention_backend == "auto" and torch.cuda.is_available() and not transformer_engine
            and flex_attention_available())
