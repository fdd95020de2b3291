"""The model and its parallel layout: ``ModelConfig`` (a Llama-style decoder) and
``ParallelConfig`` (TP/PP/CP/DP and how they communicate), each checking itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Megatron-LM's --attention-backend values (megatron.core.transformer.enums.AttnBackend), plus
# flex: our FlexAttention path for every case (model.flex_attention; GPUs, or CPU without grad)
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local", "flex")


@dataclass
class ModelConfig:
    """A Llama-style decoder (RMSNorm, SwiGLU, GQA, RoPE, no biases)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: one KV head per query head (MHA)
    kv_channels: int | None = None  # head dim; None: hidden_size // num_attention_heads
    vocab_size: int = 260
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False  # Qwen2-style
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    # RoPE: HF ``rope_parameters`` (``rope_type``, ``rope_theta``, ...); see megatron_longctx.rope
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    # Megatron-LM's padding: vocab rows padded to a multiple of this x TP (model.gpt)
    make_vocab_size_divisible_by: int = 128
    # dropout as in Megatron-LM (its defaults are 0.1; Llama trains without)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # layer spec (None: Transformer Engine's where it is installed with CUDA, else local) and
    # core attention (Megatron-LM's AttnBackend values; see megatron_longctx.model.attention)
    transformer_impl: str | None = None
    attention_backend: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                                 f"{getattr(self, name)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}; change one of them or set --kv-channels."
            )
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {self.query_groups}; each KV group must serve the same "
                f"number of query heads."
            )
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError(f"--make-vocab-size-divisible-by must be >= 1, got "
                             f"{self.make_vocab_size_divisible_by}")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got "
                                 f"{getattr(self, name)}")
        if self.transformer_impl not in (None, "local", "transformer_engine"):
            raise ValueError(f"--transformer-impl must be local or transformer_engine, got "
                             f"{self.transformer_impl!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}"
                             f", got {self.attention_backend!r}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if int(self.head_dim * self.rotary_percent) % 2:
            raise ValueError(
                f"rotary dim head_dim*rotary_percent = {self.head_dim * self.rotary_percent} "
                f"must be an even integer; change --rotary-percent."
            )
        from megatron_longctx.rope import compute_inv_freq

        compute_inv_freq(self.rope_parameters, self.head_dim, self.num_attention_heads,
                         self.query_groups, self.rotary_percent,
                         max_position_embeddings=self.max_position_embeddings)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    # Transformer Engine's CP exchange (GPU + TE only); without TE, CP all-gathers keys/values
    cp_comm_type: str = "p2p"
    # how CP splits packed documents (--reset-attention-mask): "sequence" cuts the whole sample
    # into 2*cp chunks, "document" cuts every document (Transformer Engine's THD layout, each
    # document padded to a multiple of 2*cp); "auto": document where TE attends, else sequence
    cp_partition: str = "auto"
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # megatron-core DDP: overlap the gradient reduce with the backward pass and (distributed
    # optimizer) the parameter all-gather with the next forward
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Megatron-LM's --grad-reduce-in-bf16: with --bf16, gradients accumulate and reduce in bf16
    # (half the buffer, less precision); otherwise fp32 as Megatron-LM does for bf16
    grad_reduce_in_bf16: bool = False
    distributed_backend: str | None = None  # None: nccl with CUDA, gloo without
    distributed_timeout_minutes: int = 10

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def validate(self, world_size: int, model: ModelConfig, seq_length: int | None = None) -> None:
        """Refuse layouts megatron-core cannot run, naming the flag to change."""
        tp, pp, cp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                      self.context_parallel_size)
        for name, size in (("--tensor-model-parallel-size", tp),
                           ("--pipeline-model-parallel-size", pp),
                           ("--context-parallel-size", cp)):
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        if world_size % (tp * pp * cp):
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = "
                f"{tp * pp * cp}; launch a multiple of {tp * pp * cp} processes or change the "
                f"parallel sizes."
            )
        if model.num_attention_heads % tp:
            raise ValueError(
                f"--num-attention-heads {model.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp}; use a TP size dividing it "
                f"({_divisors(model.num_attention_heads)})."
            )
        if model.query_groups % tp:
            raise ValueError(
                f"--num-query-groups {model.query_groups} is not divisible by "
                f"--tensor-model-parallel-size {tp}; use a TP size dividing it "
                f"({_divisors(model.query_groups)})."
            )
        if model.ffn_hidden_size % tp:
            raise ValueError(
                f"--ffn-hidden-size {model.ffn_hidden_size} is not divisible by "
                f"--tensor-model-parallel-size {tp}."
            )
        if model.num_layers % pp:
            raise ValueError(
                f"--num-layers {model.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {pp}; use a PP size dividing it "
                f"({_divisors(model.num_layers)})."
            )
        if self.cp_comm_type not in ("p2p", "all_gather", "a2a", "a2a+p2p"):
            raise ValueError(f"--cp-comm-type must be p2p, all_gather, a2a or a2a+p2p, got "
                             f"{self.cp_comm_type!r}")
        if self.cp_partition not in ("auto", "sequence", "document"):
            raise ValueError(f"--cp-partition must be auto, sequence or document, got "
                             f"{self.cp_partition!r}")
        if self.distributed_backend not in (None, "nccl", "gloo"):
            raise ValueError(f"--distributed-backend must be nccl or gloo, got "
                             f"{self.distributed_backend!r}")
        if self.distributed_timeout_minutes <= 0:
            raise ValueError(f"--distributed-timeout-minutes must be positive, got "
                             f"{self.distributed_timeout_minutes}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer (only "
                             "the distributed optimizer all-gathers parameters).")
        if self.sequence_parallel and tp == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1.")
        if seq_length is not None:
            if cp > 1 and seq_length % (2 * cp):
                below = seq_length - seq_length % (2 * cp)
                good = [below, below + 2 * cp]
                raise ValueError(
                    f"--seq-length {seq_length} is not divisible by 2*--context-parallel-size "
                    f"= {2 * cp} (load-balanced CP splits the sequence into 2*cp chunks); "
                    f"use e.g. {good[0]} or {good[1]}."
                )
            if self.sequence_parallel and seq_length % (tp * cp):
                raise ValueError(
                    f"--seq-length {seq_length} must be divisible by TP*CP = {tp * cp} with "
                    f"--sequence-parallel."
                )


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
