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
from functools import partial

import torch
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
from megatron_longctx.model.document_partition import (
    DocumentLayout,
    partition_documents,
    thd_cu_seqlens,
)
from megatron_longctx.model.flex_attention import flex_document_attention
from megatron_longctx.model.gpu_kernels import (
    transformer_engine_core_attention,
    uses_flex_attention,
)
from megatron_longctx.model.kv_cache import KVCache
from megatron_longctx.model.unfused_attention import unfused_attention
from megatron_longctx.rope.apply import RotaryTables, apply_rotary


@dataclass
class AttentionContext(PackedSeqParams):
    """Per-micro-batch attention inputs.

    ``doc_starts[b]``: sorted global start positions of the packed documents of sample ``b``
    (attention stays within a document); None for plain causal attention. ``documents[b]``:
    under ``--cp-partition document``, sample ``b``'s per-document CP layout (its
    ``doc_starts`` are then slot positions, see :mod:`.document_partition`). ``kv_cache``:
    during generation, the keys/values of earlier tokens (see :mod:`..kv_cache`).
    """

    rotary: RotaryTables | None = None
    doc_starts: list[list[int]] | None = None
    documents: list[DocumentLayout] | None = None
    kv_cache: KVCache | None = None
    # TE's THD parameters of the documents: built by the first layer, reused by the others
    thd: PackedSeqParams | None = None


def thd_packed_seq_params(documents: list[DocumentLayout], device) -> PackedSeqParams:
    """TE's THD parameters of a micro-batch's document layouts, with global ``cu_seqlens``
    (real lengths) and ``cu_seqlens_padded`` (slot starts), as megatron-core's
    ``get_thd_batch_on_this_cp_rank`` passes them."""
    real, padded = thd_cu_seqlens(documents)
    as_int32 = partial(torch.tensor, dtype=torch.int32, device=device)
    longest = max(max(layout.padded) for layout in documents)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=as_int32(real),
                           cu_seqlens_kv=as_int32(real), cu_seqlens_q_padded=as_int32(padded),
                           cu_seqlens_kv_padded=as_int32(padded), max_seqlen_q=longest,
                           max_seqlen_kv=longest)


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
        te_attention = transformer_engine_core_attention(config)
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
        documents = getattr(packed_seq_params, "documents", None)
        cp_size = self.config.context_parallel_size
        if self.te_attention is not None:
            # TE handles causal masking and, under CP, the exchange across ranks itself
            if doc_starts is None:
                return self.te_attention(query, key, value, None,
                                         attn_mask_type=AttnMaskType.causal)
            if documents is not None or cp_size == 1:  # packed documents: TE's THD format
                if packed_seq_params.thd is None:
                    packed_seq_params.thd = thd_packed_seq_params(
                        documents or [partition_documents(starts, s, 1) for starts in doc_starts],
                        query.device)
                return self._te_packed(query, key, value, packed_seq_params.thd)
        dropout = self.dropout if self.training else 0.0
        if self.unfused:
            attend = partial(unfused_attention, dropout=dropout,
                             fork_rng=not self.config.sequence_parallel)
        elif cp_size > 1 or doc_starts is not None or self.flex_everywhere:
            if dropout > 0.0:
                raise ValueError("--attention-dropout with document masks, context "
                                 "parallelism or FlexAttention needs --attention-backend "
                                 "unfused")
            attend = flex_document_attention if self.flex else document_causal_attention
        else:
            attend = None
        if attend is not None:
            key, value = self._global_keys(key, value, documents)
            if documents is None:
                return attend(query, key, value, self.softmax_scale,
                              self._query_chunks(s), doc_starts)
            rank = dist.get_rank(self._cp_group())
            # each sample has its own layout: one call per sample (long context: b is 1)
            outs = [attend(query[:, i:i + 1], key[:, i:i + 1], value[:, i:i + 1],
                           self.softmax_scale, layout.rank_chunks(rank), [doc_starts[i]])
                    for i, layout in enumerate(documents)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
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

    def _cp_group(self):
        return self.cp_group or parallel_state.get_context_parallel_group()

    def _global_keys(self, key: Tensor, value: Tensor,
                     documents: list[DocumentLayout] | None = None) -> tuple[Tensor, Tensor]:
        """Keys/values of the whole sequence: all-gathered across CP ranks into global order
        (slot order under the per-document layout ``documents``)."""
        if self.config.context_parallel_size == 1:
            return key, value
        group = self._cp_group()
        return gather_sequence(key, group, documents), gather_sequence(value, group, documents)

    def _query_chunks(self, s: int) -> list[tuple[int, int, int]]:
        """This rank's query chunks ``(local_start, local_end, global_start)`` (sample-level
        layout)."""
        cp_size = self.config.context_parallel_size
        if cp_size == 1:
            return [(0, s, 0)]
        return local_query_chunks(dist.get_rank(self._cp_group()), cp_size, s)

    def _te_packed(self, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams
                   ) -> Tensor:
        """Packed documents on TE: the micro-batch as one THD sequence (sample after sample,
        each sample's documents at their slots; under CP this rank's slots of each, which is
        TE's ``thd_get_partitioned_indices`` order)."""
        s, b, heads, dim = query.shape
        q, k, v = (t.transpose(0, 1).reshape(b * s, *t.shape[2:]) for t in (query, key, value))
        # megatron-core turns causal into TE's padding_causal for THD
        out = self.te_attention(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                                packed_seq_params=params)  # [b * s, np * hn]
        return out.reshape(b, s, heads * dim).transpose(0, 1)

    def _attend_with_cache(self, query: Tensor, key: Tensor, value: Tensor, cache: KVCache
                           ) -> Tensor:
        """Prefill (``cache.offset == 0``, split across CP ranks like training) or decode (new
        tokens replicated on every CP rank, queries at global positions from ``offset``)."""
        s = query.shape[0]
        if cache.offset == 0:
            key, value = self._global_keys(key, value)
            chunks = self._query_chunks(s)
        else:
            chunks = [(0, s, cache.offset)]
        key, value = cache.update(self.layer_number, key, value)
        attend = flex_document_attention if self.flex else document_causal_attention
        return attend(query, key, value, self.softmax_scale, chunks, None)
