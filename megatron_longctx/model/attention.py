"""Our core attention: rotary from explicit positions, then causal (GQA) attention that honours
packed-document boundaries and context parallelism.

megatron-core's ``Attention`` applies rotary with its own function from a ``[s, 1, 1, d]``
angle tensor: no per-head bases, no per-token attention factor, and cos/sin recomputed in every
layer. We therefore hand it no rotary at all and apply ours here, at the top of the core
attention (after the QKV projection has split heads across TP ranks). The per-batch tables ride
in :class:`AttentionContext`, the ``packed_seq_params`` object megatron-core forwards untouched
from ``GPTModel.forward`` to every core attention.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_longctx.model.blockwise_attention import document_causal_attention
from megatron_longctx.model.context_parallel import gather_sequence, local_query_chunks
from megatron_longctx.model.flex_attention import flex_document_attention
from megatron_longctx.model.gpu_kernels import transformer_engine_attention, uses_flex_attention
from megatron_longctx.model.kv_cache import KVCache
from megatron_longctx.model.unfused_attention import unfused_attention
from megatron_longctx.rope.apply import RotaryTables, apply_rotary


@dataclass
class AttentionContext(PackedSeqParams):
    """Per-micro-batch attention inputs.

    ``doc_starts[b]``: sorted global start positions of the packed documents of sample ``b``
    (attention stays within a document); None for plain causal attention. ``kv_cache``: during
    generation, the keys/values of earlier tokens (see :mod:`..kv_cache`).
    """

    rotary: RotaryTables | None = None
    doc_starts: list[list[int]] | None = None
    kv_cache: KVCache | None = None


class CoreAttention(MegatronModule):
    """``query [s, b, np, hn]``, ``key/value [s, b, ng, hn]`` -> ``[s, b, np * hn]``.

    Plain causal attention uses Transformer Engine's attention on GPUs that have it (see
    ``gpu_kernels``), else torch's ``scaled_dot_product_attention`` (flash kernels on CPU and
    GPU). Packed documents and context parallelism (keys/values all-gathered across the CP
    group) go through :func:`document_causal_attention`, also flash-based, or on CUDA without
    TE (and everywhere with ``--attention-backend flex``) FlexAttention. None of these
    builds an ``s x s`` mask; ``--attention-backend unfused|local`` (without TE) picks the
    explicit-softmax :func:`unfused_attention`, which does.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.cp_group = pg_collection.cp if pg_collection is not None else None
        # --transformer-impl picks Transformer Engine (set only where it is usable, model.gpt);
        # --attention-backend then picks TE's kernel (megatron-core sets NVTE_*_ATTN), or ours
        explicit_flex = getattr(config, "flex_attention_backend", False)
        te_attention = (transformer_engine_attention()
                        if config.transformer_impl == "transformer_engine"
                        and config.attention_backend != AttnBackend.local
                        and not explicit_flex else None)
        self.te_attention = None if te_attention is None else te_attention(
            config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type=attention_type, attention_dropout=attention_dropout,
            softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"only causal attention is supported, got {attn_mask_type}")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        # --attention-dropout: TE, the unfused path and plain SDPA apply it; the flash-based
        # blockwise path (document masks, CP) has none, so config validation refuses that case
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.unfused = self.te_attention is None and config.attention_backend in (
            AttnBackend.unfused, AttnBackend.local)
        # FlexAttention: everywhere with --attention-backend flex; with auto, for documents
        # and CP on CUDA without TE (gpu_kernels.uses_flex_attention)
        self.flex_everywhere = explicit_flex
        self.flex = explicit_flex or uses_flex_attention(
            config.attention_backend.name, te_attention is not None)
        self.interleaved = config.rotary_interleaved

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> Tensor:
        rotary = getattr(packed_seq_params, "rotary", None)
        if rotary is not None:
            query = apply_rotary(query, rotary.cos_q, rotary.sin_q, self.interleaved)
            key = apply_rotary(key, rotary.cos_k, rotary.sin_k, self.interleaved)
        s, b, heads, head_dim = query.shape
        cache = getattr(packed_seq_params, "kv_cache", None)
        if cache is not None:
            return self._attend_with_cache(query, key, value, cache)
        doc_starts = getattr(packed_seq_params, "doc_starts", None)
        if self.te_attention is not None and doc_starts is None:
            # TE handles causal masking and, under CP, the exchange across ranks itself
            return self.te_attention(query, key, value, None, attn_mask_type=AttnMaskType.causal)
        dropout = self.dropout if self.training else 0.0
        if self.unfused:
            key, value, chunks = self._global_keys(key, value, s)
            return unfused_attention(query, key, value, self.softmax_scale, chunks, doc_starts,
                                     dropout, fork_rng=not self.config.sequence_parallel)
        if self.config.context_parallel_size > 1 or doc_starts is not None or \
                self.flex_everywhere:
            if dropout > 0.0:
                raise ValueError("--attention-dropout with document masks, context "
                                 "parallelism or FlexAttention needs --attention-backend "
                                 "unfused")
            key, value, chunks = self._global_keys(key, value, s)
            attend = flex_document_attention if self.flex else document_causal_attention
            return attend(query, key, value, self.softmax_scale, chunks, doc_starts)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        # dropout draws from the model-parallel RNG (each TP rank holds other heads), as
        # Megatron-LM's DotProductAttention; with sequence parallelism megatron-core forks
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout > 0.0 and not self.config.sequence_parallel else nullcontext())
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=dropout,
                enable_gqa=k.shape[1] != q.shape[1],
            )  # [b, np, s, hn]
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)

    def _global_keys(self, key: Tensor, value: Tensor, s: int
                     ) -> tuple[Tensor, Tensor, list[tuple[int, int, int]]]:
        """Keys/values of the whole sequence (all-gathered across CP ranks) and this rank's
        query chunks ``(local_start, local_end, global_start)``."""
        cp_size = self.config.context_parallel_size
        if cp_size == 1:
            return key, value, [(0, s, 0)]
        group = self.cp_group or parallel_state.get_context_parallel_group()
        key, value = gather_sequence(key, group), gather_sequence(value, group)
        return key, value, local_query_chunks(dist.get_rank(group), cp_size, s)

    def _attend_with_cache(self, query: Tensor, key: Tensor, value: Tensor, cache: KVCache
                           ) -> Tensor:
        """Prefill (``cache.offset == 0``, split across CP ranks like training) or decode (new
        tokens replicated on every CP rank, queries at global positions from ``offset``)."""
        s = query.shape[0]
        if cache.offset == 0:
            key, value, chunks = self._global_keys(key, value, s)
        else:
            chunks = [(0, s, cache.offset)]
        key, value = cache.update(self.layer_number, key, value)
        attend = flex_document_attention if self.flex else document_causal_attention
        return attend(query, key, value, self.softmax_scale, chunks, None)
