"""``LongContextGPTModel``: megatron-core's ``GPTModel`` with our rotary module.

``GPTModel`` hard-codes its rotary choice; we build it with ``position_embedding_type='none'``
and compute rotary tables ourselves from explicit ``position_ids [b, s]`` once per forward,
handing them to every layer's core attention through :class:`AttentionContext`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_longctx.config import ModelConfig, ParallelConfig, TrainingConfig
from megatron_longctx.model.attention import AttentionContext
from megatron_longctx.model.chunked_loss import chunked_cross_entropy, logits_chunk_tokens
from megatron_longctx.model.document_partition import DocumentLayout
from megatron_longctx.model.gpu_kernels import (
    gradient_accumulation_fusion_available,
    use_transformer_engine,
)
from megatron_longctx.model.kv_cache import KVCache
from megatron_longctx.model.layer_spec import llama_block_spec
from megatron_longctx.rope import RotaryEmbedding


def transformer_config(model: ModelConfig, parallel: ParallelConfig, bf16: bool = False,
                       recompute: TrainingConfig | None = None,
                       initialize: bool = True,
                       grad_accumulation_fusion: bool = False) -> TransformerConfig:
    """Translate our model config into megatron-core's ``TransformerConfig`` (Llama choices).
    ``initialize=False``: weights are left as allocated (``torch.empty``), for callers that
    fill every one of them. ``grad_accumulation_fusion``: the model trains under megatron-core's
    DDP (whose buffers give each weight the fp32 ``main_grad`` the fused wgrad GEMMs add into);
    the fusion is on where its kernels exist (``gpu_kernels``), as Megatron-LM's default."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    granularity = recompute.recompute_granularity if recompute else None
    config = TransformerConfig(
        recompute_granularity=granularity,
        recompute_method=recompute.recompute_method if granularity == "full" else None,
        recompute_num_layers=recompute.recompute_num_layers if granularity == "full" else None,
        recompute_modules=["core_attn"] if granularity == "selective" else None,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        # megatron-core sets Transformer Engine's NVTE_*_ATTN from it; our core attention reads it
        attention_backend=AttnBackend[megatron_attention_backend(model.attention_backend)],
        # --attention-backend local is megatron-core's local attention: the local spec
        transformer_impl="transformer_engine" if use_transformer_engine(model.transformer_impl)
        and model.attention_backend != "local" else "local",
        init_method_std=model.init_method_std,
        rotary_interleaved=model.rotary_interleaved,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        cp_comm_type=parallel.cp_comm_type,
        sequence_parallel=parallel.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # weights are drawn on the CPU as full matrices and then split, so every TP/PP layout
        # starts from the same weights; kernels that only exist on GPUs are off
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=grad_accumulation_fusion
        and gradient_accumulation_fusion_available(),
        persist_layer_norm=False,
        perform_initialization=initialize,
    )
    # --attention-backend flex is ours (megatron-core's enum has no such value): the core
    # attention reads it here
    config.flex_attention_backend = model.attention_backend == "flex"
    return config


def megatron_attention_backend(backend: str) -> str:
    """megatron-core's ``AttnBackend`` for ours (``flex`` is ours alone: TE picks its own)."""
    return "auto" if backend == "flex" else backend


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's padding (``_vocab_size_with_padding``): up to a multiple of
    ``divisible_by * tp``, so embedding shapes equal Megatron-LM's at every TP size. The rows
    therefore change with TP; checkpoints store the unpadded size (``args.model.vocab_size``)
    and loading at another TP pads or trims the padding rows (see ``check_checkpoint_shapes``).
    """
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


_NVTE = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
_NVTE_SET_HERE: dict[str, str] = {}  # set by _set_attention_backend, not by the user


class LongContextGPTModel(GPTModel):
    def __init__(self, config: TransformerConfig, model: ModelConfig, vocab_size: int,
                 pre_process: bool = True, post_process: bool = True,
                 cross_entropy_chunk_size: int | None = None):
        super().__init__(
            config=config,
            transformer_layer_spec=llama_block_spec(config),
            vocab_size=vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="none",
        )
        self.unpadded_vocab_size = model.vocab_size  # rows beyond it: Megatron-LM's padding
        # --cross-entropy-chunk-size (None: automatic, 0: off), read by _postprocess
        self.cross_entropy_chunk_size = cross_entropy_chunk_size
        self.rotary = RotaryEmbedding(
            model.rope_parameters, model.head_dim, model.num_attention_heads, model.query_groups,
            rotary_percent=model.rotary_percent,
            max_position_embeddings=model.max_position_embeddings,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        )

    def _set_attention_backend(self) -> None:
        """megatron-core exports --attention-backend as Transformer Engine's ``NVTE_*_ATTN``
        and asserts that values already set agree. Without TE they select nothing; with TE, a
        process that builds models with other backends (eval, tests) may replace the values an
        earlier model set, while values the user exported are still checked."""
        if self.config.transformer_impl != "transformer_engine":
            return
        for name, value in _NVTE_SET_HERE.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        before = {n for n in _NVTE if n in os.environ}
        super()._set_attention_backend()
        _NVTE_SET_HERE.update({n: os.environ[n] for n in _NVTE if n not in before})

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, doc_starts: list[list[int]] | None = None,
                rope_seq_len: int | None = None, kv_cache: KVCache | None = None,
                documents: list[DocumentLayout] | None = None, **kwargs) -> Tensor:
        """input_ids, position_ids, labels: ``[b, s]`` (this CP rank's tokens, with their global
        positions). ``doc_starts``: global document starts per sample (packed samples);
        ``documents``: their per-document CP layouts (``--cp-partition document``).
        ``rope_seq_len``: the full sequence length for length-dependent RoPE under CP (and the
        final length during generation). ``kv_cache``: generation's cache (``input_ids`` are
        then the tokens after the cached ones).
        Returns per-token loss ``[b, s]`` when labels are given, else logits
        ``[b, s, vocab / tp]``."""
        tables = self.rotary(position_ids, dtype=self.config.params_dtype, seq_len=rope_seq_len)
        context = AttentionContext(qkv_format="sbhd", rotary=tables, doc_starts=doc_starts,
                                   documents=documents, kv_cache=kv_cache)
        return super().forward(input_ids, position_ids, attention_mask, labels=labels,
                               packed_seq_params=context, **kwargs)

    def _postprocess(self, hidden_states: Tensor, input_ids: Tensor, position_ids: Tensor,
                     labels: Tensor | None, *args, **kwargs) -> Tensor:
        """With labels, the loss comes from the decoder's hidden states ``[s, b, h]`` in
        sequence chunks (:mod:`megatron_longctx.model.chunked_loss`) when chunking is on, never
        materializing the full logits; megatron-core's path otherwise (logits, MTP, inference).
        """
        chunk = 0
        if (labels is not None and self.post_process and self.config.mtp_num_layers is None
                and kwargs.get("inference_context") is None):
            chunk = logits_chunk_tokens(self.cross_entropy_chunk_size, labels.numel(),
                                        self.output_layer.output_size_per_partition)
        if not chunk:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        out = self.output_layer
        return chunked_cross_entropy(hidden_states, weight, labels, chunk,
                                     sequence_parallel=out.sequence_parallel,
                                     allreduce_grad=out.allreduce_dgrad, group=out.tp_group)


def build_model(model: ModelConfig, parallel: ParallelConfig, bf16: bool = False,
                training: TrainingConfig | None = None, initialize: bool = True,
                grad_accumulation_fusion: bool = False) -> LongContextGPTModel:
    """This rank's stage of the model (call after ``initialize_model_parallel``);
    ``initialize=False`` skips drawing the weights, ``grad_accumulation_fusion`` is for models
    wrapped in megatron-core's DDP (see :func:`transformer_config`)."""
    config = transformer_config(model, parallel, bf16, training, initialize,
                                grad_accumulation_fusion)
    vocab = padded_vocab_size(model.vocab_size, parallel.tensor_model_parallel_size,
                              model.make_vocab_size_divisible_by)
    gpt = LongContextGPTModel(
        config, model, vocab,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        cross_entropy_chunk_size=training.cross_entropy_chunk_size if training else None,
    )
    if not initialize:
        _set_tensor_parallel_attributes(gpt)
    if torch.cuda.is_available():  # norms and rotary buffers are built on the CPU
        gpt.cuda(torch.cuda.current_device())
    return gpt


def _set_tensor_parallel_attributes(gpt: torch.nn.Module) -> None:
    """megatron-core marks a weight as TP-split (``tensor_model_parallel``, ``partition_dim``)
    only while drawing it: mark the undrawn ones the same way."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in gpt.modules():
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)
