"""How a run trains: schedule and optimizer (``TrainingConfig``), checkpoints
(``CheckpointConfig``), logging (``LoggingConfig``) and data (``DataConfig``), each checking
itself."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """Where samples come from, with Megatron-LM's flags (megatron_longctx.data.samples.blend):
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
        from megatron_longctx.data.samples.blend import check_data_config

        check_data_config(self)
