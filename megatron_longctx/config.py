"""One typed configuration for models, parallel layout and training.

The same dataclasses feed the command line (``tools/pretrain.py``: Megatron-LM flag names),
YAML recipes (``examples/*.yaml``: the same names with ``_``) and the code. Each section checks
itself in ``validate()`` and raises ``ValueError`` saying what to change, before any expensive
work starts.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

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
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # megatron-core DDP: overlap the gradient reduce with the backward pass and (distributed
    # optimizer) the parameter all-gather with the next forward
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
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


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


@dataclass
class TrainingConfig:
    seq_length: int = 256
    micro_batch_size: int = 2
    global_batch_size: int = 8
    # run length: iterations or samples (Megatron-LM: exactly one of them)
    train_iters: int | None = None
    train_samples: int | None = None
    # learning-rate and weight-decay schedule: megatron-core's OptimizerParamScheduler with
    # Megatron-LM's flags; counted in samples, so --train-samples runs schedule identically
    lr: float = 3e-3
    min_lr: float = 0.0
    lr_warmup_init: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None
    lr_warmup_samples: int = 0
    lr_decay_iters: int | None = None  # default: --train-iters
    lr_decay_samples: int | None = None  # default: --train-samples
    lr_decay_style: str = "linear"
    lr_wsd_decay_style: str = "exponential"
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_samples: int | None = None
    weight_decay: float = 0.01
    start_weight_decay: float | None = None  # default: --weight-decay
    end_weight_decay: float | None = None
    weight_decay_incr_style: str = "constant"
    # a resumed run keeps the checkpoint's schedule (use-checkpoint) or takes these flags
    # (override); by default the two must agree
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    optimizer: str = "adam"  # adam (AdamW: decoupled weight decay, as Megatron-LM) | sgd
    sgd_momentum: float = 0.9
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
    # loss without the full logits (megatron_longctx.model.chunked_loss): tokens per chunk;
    # None: chunked when one micro-batch's fp32 logits would exceed 1 GiB; 0: off
    cross_entropy_chunk_size: int | None = None
    eval_interval: int | None = None  # validation loss every N steps (on the --split valid part)
    eval_iters: int = 10  # validation global batches per evaluation
    # long-context validation: perplexity at these context lengths on held-out documents of at
    # least the longest one, every --eval-interval (the extension team's first curve)
    eval_lengths: list[int] | None = None
    eval_documents: int = 2
    # stopping: a non-finite loss or gradient stops the run before the update (never saved)
    check_for_nan_in_loss_and_grad: bool = True
    exit_signal_handler: bool = False  # SIGTERM/SIGUSR1: finish the iteration, save, exit 0
    exit_duration_in_mins: float | None = None
    exit_interval: int | None = None  # stop (and save) at the first iteration divisible by N
    peak_tflops: float | None = None  # MFU denominator; default: known GPU table / CPU matmul
    # the loss is also reported by position bucket (bounds, in tokens) and by blend source
    loss_position_buckets: list[int] = field(default_factory=lambda: [4096, 32768])

    @property
    def iterations(self) -> int:
        """Iterations of the run (from --train-samples when that is given)."""
        if self.train_iters is not None:
            return self.train_iters
        return (self.train_samples or 0) // self.global_batch_size

    def validate(self, data_parallel_size: int) -> None:
        if self.seq_length <= 0 or self.micro_batch_size <= 0:
            raise ValueError("--seq-length and --micro-batch-size must be positive.")
        if (self.train_iters is None) == (self.train_samples is None):
            raise ValueError("give exactly one of --train-iters and --train-samples "
                             f"(got {self.train_iters} and {self.train_samples}).")
        if (self.train_iters or 0) < 0 or (self.train_samples or 0) < 0:
            raise ValueError("--train-iters/--train-samples must be non-negative.")
        if self.global_batch_size % (self.micro_batch_size * data_parallel_size):
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size x data-parallel size = {self.micro_batch_size} x "
                f"{data_parallel_size} = {self.micro_batch_size * data_parallel_size}; make it "
                f"a multiple of {self.micro_batch_size * data_parallel_size}."
            )
        for flag, value, allowed in (("--lr-decay-style", self.lr_decay_style, LR_DECAY_STYLES),
                                     ("--lr-wsd-decay-style", self.lr_wsd_decay_style,
                                      WSD_DECAY_STYLES),
                                     ("--weight-decay-incr-style", self.weight_decay_incr_style,
                                      WD_INCR_STYLES)):
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(f"--recompute-granularity must be selective or full, got "
                             f"{self.recompute_granularity!r}")
        if self.recompute_method not in ("uniform", "block"):
            raise ValueError(f"--recompute-method must be uniform or block, got "
                             f"{self.recompute_method!r}")
        if self.cross_entropy_chunk_size is not None and self.cross_entropy_chunk_size < 0:
            raise ValueError(f"--cross-entropy-chunk-size must be >= 0 (0: off), got "
                             f"{self.cross_entropy_chunk_size}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}.")
        if self.lr_warmup_init > self.lr:
            raise ValueError(f"--lr-warmup-init {self.lr_warmup_init} exceeds --lr {self.lr}.")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt_param-scheduler and "
                             "--use-checkpoint-opt_param-scheduler exclude each other; pick one.")
        if self.exit_interval is not None and self.exit_interval <= 0:
            raise ValueError(f"--exit-interval must be positive, got {self.exit_interval}")
        from megatron_longctx.training.schedule import schedule_steps

        schedule_steps(self)  # warmup/decay consistency, in the flags' own terms


@dataclass
class CheckpointConfig:
    """Where weights come from and go to (Megatron-LM's flags and semantics)."""

    save: str | None = None  # checkpoint root (Megatron-LM layout); saved at the end too
    save_interval: int | None = None
    load: str | None = None  # resume from the latest checkpoint here (may equal --save)
    # weights only, used when --load holds no checkpoint yet: one command starts and resumes
    pretrained_checkpoint: str | None = None
    finetune: bool = False  # weights from --load, iteration 0, fresh optimizer and RNG
    load_optim: bool = True
    load_rng: bool = True
    save_optim: bool = True
    save_rng: bool = True
    exit_on_missing_checkpoint: bool = False
    # --save holds checkpoints this run does not resume: delete them when training starts
    # (default: refuse, so a mistyped --load never overwrites a run)
    override_save: bool = False
    use_checkpoint_args: bool = False  # model shape from the checkpoint's metadata
    ckpt_step: int | None = None  # load this iteration instead of the latest
    keep_last: int | None = None  # delete older checkpoints once a newer one is complete
    async_save: bool = False  # shards written in the background; training goes on meanwhile
    ckpt_format: str = "torch_dist"  # megatron-core dist checkpoints, the only format here

    def validate(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"--keep-last must be >= 1, got {self.keep_last}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.ckpt_format != "torch_dist":
            raise ValueError(f"--ckpt-format {self.ckpt_format} is not supported: checkpoints "
                             f"here are megatron-core distributed checkpoints, which reshard "
                             f"across layouts (Megatron-LM's legacy per-rank 'torch' format is "
                             f"neither written nor read); use --ckpt-format torch_dist.")
        if self.finetune and not self.load:
            raise ValueError("--finetune loads weights from --load; give --load DIR (or use "
                             "--pretrained-checkpoint DIR).")


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: str | None = None
    wandb_project: str | None = None  # WANDB_MODE=offline works without a network
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None  # default: --save
    # torch.profiler over iterations [start, end) of this launch on these ranks; the trace goes
    # to --tensorboard-dir (else <save>/profile). --use-pytorch-profiler: always torch's here
    profile: bool = False
    use_pytorch_profiler: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class DataConfig:
    """Where samples come from, with Megatron-LM's flags (megatron_longctx.data.blend):
    ``data_path`` (split by ``split``) or the per-split paths, or ``mock_data``; ``["stdlib"]``
    is the built-in corpus (Python's standard-library sources, byte tokens)."""

    # indexed-dataset prefixes, weighted ["0.7", "general", "0.3", "code"] or not ["a", "b"]
    # (then weighted by their sizes, as Megatron-LM)
    data_path: list[str] | None = None
    split: str | None = None  # default with data_path: Megatron-LM's "969,30,1"
    train_data_path: list[str] | None = None  # instead of data_path + split: one blend a split
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    data_args_path: str | None = None  # a file holding the data_path list
    per_split_data_args_path: str | None = None  # JSON {"train": [...], "valid":..., "test":...}
    mock_data: bool = False  # megatron-core's MockGPTDataset documents (synthetic tokens)
    tokenizer_type: str = "ByteTokenizer"
    tokenizer_model: str | None = None
    # Megatron-LM's --vocab-size, the tokenizer's when it has no file (NullTokenizer: ids
    # 0..N-1, EOD = N); the model's vocabulary, model.vocab_size, comes from the tokenizer
    vocab_size: int | None = None
    dataloader_type: str = "cyclic"  # cyclic: reshuffled every epoch | single: dataset order
    num_workers: int = 0  # processes collating the coming micro-batches (0: in the trainer)
    reset_position_ids: bool = False  # positions restart at every packed document
    reset_attention_mask: bool = False  # attention stays within each packed document
    eod_mask_loss: bool = False  # no loss on predicting the token after an EOD
    # per source "THRESHOLD:KEEP_P" (or one for all): keep docs < THRESHOLD tokens with KEEP_P
    length_upsample: list[str] | None = None
    data_cache_path: str | None = None  # sample-index cache; default: beside the data
    # PoSE / LongRecipe (methods.position_transform): samples of --seq-length tokens from single
    # documents, their position ids spread over --target-length; --pack-short packs (without
    # the transform) the documents too short for one sample instead of dropping them
    position_transform: str = "none"
    target_length: int | None = None
    pack_short: bool = False

    def validate(self) -> None:
        from megatron_longctx.data.blend import check_data_config

        check_data_config(self)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int) -> None:
        self.model.validate()
        self.parallel.validate(world_size, self.model, self.training.seq_length)
        self.training.validate(self.parallel.data_parallel_size(world_size))
        self.checkpoint.validate()
        self.data.validate()
        self._check_position_transform()
        if self.logging.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.logging.log_interval}")
        log = self.logging
        if log.profile and not 0 <= log.profile_step_start < log.profile_step_end:
            raise ValueError(f"--profile-step-start {log.profile_step_start} must be >= 0 and "
                             f"below --profile-step-end {log.profile_step_end}")
        if log.profile and not (log.tensorboard_dir or self.checkpoint.save):
            raise ValueError("--profile writes its trace to --tensorboard-dir (or <save>/profile)"
                             "; give one of them")
        import torch

        from megatron_longctx.model.gpu_kernels import use_transformer_engine, uses_flex_attention

        m, cp = self.model, self.parallel.context_parallel_size
        if m.attention_backend == "local" and m.transformer_impl == "transformer_engine":
            raise ValueError("--attention-backend local is megatron-core's local attention; it "
                             "needs --transformer-impl local (as in Megatron-LM)")
        unfused = m.attention_backend in ("unfused", "local")
        te = use_transformer_engine(m.transformer_impl) and m.attention_backend not in (
            "local", "flex")
        flex = uses_flex_attention(m.attention_backend, te)
        if m.attention_backend == "flex" and not torch.cuda.is_available():
            raise ValueError("--attention-backend flex: torch has no FlexAttention backward on "
                             "CPU; train with --attention-backend auto (it serves evaluation)")
        # our document/CP path (blockwise flash, or FlexAttention): document masks always, CP
        # without Transformer Engine; flex also takes plain causal attention
        ours = not unfused and (self.data.reset_attention_mask or (cp > 1 and not te) or
                                m.attention_backend == "flex")
        if ours and m.attention_dropout > 0:
            raise ValueError(f"--attention-dropout {m.attention_dropout} with "
                             f"--reset-attention-mask, --context-parallel-size > 1 or "
                             f"--attention-backend flex runs on attention kernels without "
                             f"dropout here; use --attention-backend unfused (s x s scores) or "
                             f"--attention-dropout 0")
        if torch.cuda.is_available() and ours and not flex and not self.training.bf16:
            raise ValueError("on GPUs, --reset-attention-mask and --context-parallel-size > 1 "
                             "run on flash-attention kernels, which need --bf16 (or torch's "
                             "FlexAttention: --attention-backend flex)")
        if self.parallel.distributed_backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("--distributed-backend nccl needs CUDA; use gloo on CPU machines")
        if self.training.optimizer == "sgd" and self.parallel.use_distributed_optimizer:
            raise ValueError("--use-distributed-optimizer supports --optimizer adam only "
                             "(megatron-core); drop one of them")

    def _check_position_transform(self) -> None:
        from megatron_longctx.methods.position_transform import TRANSFORMS

        d, s = self.data, self.training.seq_length
        if d.position_transform not in TRANSFORMS:
            raise ValueError(f"--position-transform {d.position_transform!r}: expected one of "
                             f"{', '.join(TRANSFORMS)}")
        if d.position_transform == "none":
            if d.pack_short or d.target_length is not None:
                raise ValueError("--pack-short and --target-length go with --position-transform "
                                 "pose|longrecipe")
            return
        if d.target_length is None or d.target_length < s:
            raise ValueError(f"--position-transform {d.position_transform} needs --target-length"
                             f" >= --seq-length {s} (the window the positions span), got "
                             f"{d.target_length}")
        if d.data_path == ["stdlib"]:
            raise ValueError("--position-transform takes single documents of an indexed "
                             "dataset; --data-path stdlib is a token stream: preprocess data "
                             "with tools/preprocess_data.py and pass its prefix")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"a recipe is a mapping of sections, got {type(raw).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected "
                             f"{sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            values = raw.get(f.name) or {}
            if not isinstance(values, dict):
                raise ValueError(f"section '{f.name}' must be a mapping, got {values!r}")
            hints = typing.get_type_hints(section_cls)
            bad = set(values) - set(hints)
            if bad:
                raise ValueError(f"unknown keys in section '{f.name}': {sorted(bad)}; "
                                 f"known: {sorted(hints)}")
            kwargs[f.name] = section_cls(**{k: _typed(f"{f.name}.{k}", v, hints[k])
                                            for k, v in values.items()})
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str) -> RunConfig:
        stages = load_stages(path)
        if len(stages) != 1:
            raise ValueError(f"{path} has {len(stages)} stages; load it with load_stages()")
        return stages[0]


def _typed(where: str, value: Any, tp: Any) -> Any:
    """``value`` checked against a field's annotation. YAML reads ``3e-4`` as a string and
    ``"false"`` stays a string: both would be used silently otherwise."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is dict:  # rope_parameters: YAML 1.1 reads 1.0e6 (no sign) as a string
        ok = isinstance(value, dict)
        value = {k: _yaml_number(v) for k, v in value.items()} if ok else value
    elif origin is list:
        ok = isinstance(value, list)
        value = [str(v) for v in value] if ok and typing.get_args(tp) == (str,) else value
    else:
        ok = isinstance(value, origin)
    if not ok:
        name = getattr(tp, "__name__", str(tp))
        raise ValueError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")
    return value


def _yaml_number(value: Any) -> Any:
    if isinstance(value, list):
        return [_yaml_number(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``; nested sections merge, ``rope_parameters`` is replaced
    whole (a stage that switches RoPE method must not inherit the old method's keys)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and \
                key != "rope_parameters":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_stages(path: str) -> list[RunConfig]:
    """The configs of a YAML recipe: one, or one per entry of its ``stages:`` list (each
    deep-merged over the recipe's top level)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    stages = raw.pop("stages", None)
    if stages is None:
        return [RunConfig.from_dict(raw)]
    if not isinstance(stages, list) or not stages or \
            not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"{path}: 'stages' must be a non-empty list of mappings")
    configs = []
    for k, stage in enumerate(stages, start=1):
        try:
            configs.append(RunConfig.from_dict(_deep_merge(raw, stage)))
        except ValueError as err:
            raise ValueError(f"{path}, stage {k}: {err}") from None
    return configs


def chain_stages(configs: list[RunConfig]) -> list[RunConfig]:
    """Stage k saves to and resumes from ``<save>/stage_<k>`` (TensorBoard: ``<dir>/stage_<k>``)
    and stage k+1 starts from stage k's final weights (``--pretrained-checkpoint`` semantics:
    fresh optimizer, schedule and RNG); only stage 1 takes ``pretrained_checkpoint`` from the
    recipe."""
    if len(configs) < 2:
        return configs
    for k, cfg in enumerate(configs, start=1):
        ck = cfg.checkpoint
        for name in ("load", "ckpt_step", "finetune"):
            if getattr(ck, name):
                raise ValueError(
                    f"stage {k}: checkpoint.{name} (--{name.replace('_', '-')}) is set, but "
                    f"stages load their own checkpoints (<save>/stage_<k>); start stage 1 from "
                    f"other weights with checkpoint.pretrained_checkpoint")
        if not ck.save:
            raise ValueError("a recipe with stages needs checkpoint.save (or --save): each stage "
                             "saves to <save>/stage_<k> and the next starts from it")
        ck.save = ck.load = os.path.join(ck.save, f"stage_{k}")
        if cfg.logging.tensorboard_dir:
            cfg.logging.tensorboard_dir = os.path.join(cfg.logging.tensorboard_dir, f"stage_{k}")
        if cfg.logging.wandb_exp_name:
            cfg.logging.wandb_exp_name = f"{cfg.logging.wandb_exp_name}-stage_{k}"
        if k > 1:
            ck.pretrained_checkpoint = configs[k - 2].checkpoint.save
    return configs
