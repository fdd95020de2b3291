"""One typed configuration for models, parallel layout and training.

The same dataclasses feed the command line (``tools/pretrain.py``: Megatron-LM flag names),
YAML recipes (``examples/*.yaml``: the same names with ``_``) and the code. Each section checks
itself in ``validate()`` and raises ``ValueError`` saying what to change, before any expensive
work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml


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
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False

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


@dataclass
class TrainingConfig:
    seq_length: int = 256
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = False
    # activation recompute, as Megatron-LM: "selective" recomputes core attention (with CP, the
    # gathered keys/values are then not kept per layer); "full" recomputes whole layers
    recompute_granularity: str | None = None  # None | selective | full
    recompute_method: str = "uniform"  # full: uniform | block
    recompute_num_layers: int = 1  # full: layers per recompute chunk (uniform) or count (block)
    log_interval: int = 10
    eval_interval: int | None = None  # validation loss every N steps (on the --split valid part)
    eval_iters: int = 10  # validation global batches per evaluation
    save: str | None = None  # checkpoint root (Megatron-LM layout); saved at the end too
    save_interval: int | None = None
    load: str | None = None  # resume from the latest checkpoint here (may equal --save)

    def validate(self, data_parallel_size: int) -> None:
        if self.seq_length <= 0 or self.micro_batch_size <= 0 or self.train_iters < 0:
            raise ValueError("--seq-length and --micro-batch-size must be positive, "
                             "--train-iters non-negative.")
        if self.global_batch_size % (self.micro_batch_size * data_parallel_size):
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size x data-parallel size = {self.micro_batch_size} x "
                f"{data_parallel_size} = {self.micro_batch_size * data_parallel_size}; make it "
                f"a multiple of {self.micro_batch_size * data_parallel_size}."
            )
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr-decay-style must be cosine, linear or constant, got "
                             f"{self.lr_decay_style!r}")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(f"--recompute-granularity must be selective or full, got "
                             f"{self.recompute_granularity!r}")
        if self.recompute_method not in ("uniform", "block"):
            raise ValueError(f"--recompute-method must be uniform or block, got "
                             f"{self.recompute_method!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}.")


@dataclass
class DataConfig:
    # "stdlib": Python's standard-library sources, byte tokens (zero setup). Otherwise Megatron
    # indexed-dataset prefixes, optionally weighted: ["0.7", "general", "0.3", "code"].
    data_path: list[str] = field(default_factory=lambda: ["stdlib"])
    split: str = "969,30,1"
    tokenizer_type: str = "ByteTokenizer"
    tokenizer_model: str | None = None
    reset_position_ids: bool = False  # positions restart at every packed document
    reset_attention_mask: bool = False  # attention stays within each packed document
    eod_mask_loss: bool = False  # no loss on predicting the token after an EOD
    # per source "THRESHOLD:KEEP_P" (or one for all): keep docs < THRESHOLD tokens with KEEP_P
    length_upsample: list[str] | None = None
    data_cache_path: str | None = None  # sample-index cache; default: beside the data


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, world_size: int) -> None:
        self.model.validate()
        self.parallel.validate(world_size, self.model, self.training.seq_length)
        self.training.validate(self.parallel.data_parallel_size(world_size))
        import torch

        blockwise = self.parallel.context_parallel_size > 1 or self.data.reset_attention_mask
        if torch.cuda.is_available() and blockwise and not self.training.bf16:
            raise ValueError("on GPUs, --reset-attention-mask and --context-parallel-size > 1 "
                             "run on flash-attention kernels, which need --bf16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected "
                             f"{sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            values = raw.get(f.name) or {}
            names = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = set(values) - names
            if bad:
                raise ValueError(f"unknown keys in section '{f.name}': {sorted(bad)}; "
                                 f"known: {sorted(names)}")
            kwargs[f.name] = section_cls(**values)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str) -> RunConfig:
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})
