"""``RunConfig``: the sections of one run, the checks that span sections, and the dict form
that recipes and checkpoints use."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from megatron_longctx.config.model import ModelConfig, ParallelConfig
from megatron_longctx.config.training import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    TrainingConfig,
)
from megatron_longctx.config.values import typed_value


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

        from megatron_longctx.model.gpu_kernels import uses_flex_attention

        m, cp = self.model, self.parallel.context_parallel_size
        if m.attention_backend == "local" and m.transformer_impl == "transformer_engine":
            raise ValueError("--attention-backend local is megatron-core's local attention; it "
                             "needs --transformer-impl local (as in Megatron-LM)")
        if (self.parallel.cp_partition == "document" and cp > 1
                and not self.data.reset_attention_mask):
            raise ValueError("--cp-partition document splits packed documents across CP ranks; "
                             "it needs --reset-attention-mask (or use --cp-partition auto)")
        unfused = m.attention_backend in ("unfused", "local")
        te = self._te_attention()
        flex = uses_flex_attention(m.attention_backend, te)
        # Transformer Engine takes packed documents in its THD format without CP, and with CP
        # under the per-document partition
        te_documents = te and (cp == 1 or self.cp_document_partition())
        if m.attention_backend == "flex" and not torch.cuda.is_available():
            raise ValueError("--attention-backend flex: torch has no FlexAttention backward on "
                             "CPU; train with --attention-backend auto (it serves evaluation)")
        # our document/CP path (blockwise flash, or FlexAttention): document masks always, CP
        # without Transformer Engine; flex also takes plain causal attention
        ours = not unfused and ((self.data.reset_attention_mask and not te_documents) or
                                (cp > 1 and not te) or m.attention_backend == "flex")
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
        if self.parallel.grad_reduce_in_bf16 and not self.training.bf16:
            raise ValueError("--grad-reduce-in-bf16 reduces bf16 gradients; it needs --bf16")
        if self.training.optimizer == "sgd" and self.parallel.use_distributed_optimizer:
            raise ValueError("--use-distributed-optimizer supports --optimizer adam only "
                             "(megatron-core); drop one of them")

    def _te_attention(self) -> bool:
        """Whether Transformer Engine's attention runs here (CUDA with TE, not turned off)."""
        from megatron_longctx.model.gpu_kernels import use_transformer_engine

        m = self.model
        return use_transformer_engine(m.transformer_impl) and m.attention_backend not in (
            "local", "flex")

    def cp_document_partition(self) -> bool:
        """Whether context parallelism splits each packed document (``--cp-partition``;
        ``auto``: where Transformer Engine attends, whose THD format with CP needs it)."""
        p = self.parallel
        if p.context_parallel_size == 1 or not self.data.reset_attention_mask:
            return False
        if p.cp_partition == "auto":
            return self._te_attention()
        return p.cp_partition == "document"

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
            kwargs[f.name] = section_cls(**{k: typed_value(f"{f.name}.{k}", v, hints[k])
                                            for k, v in values.items()})
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str) -> RunConfig:
        from megatron_longctx.config.recipes import load_stages  # recipes build RunConfigs

        stages = load_stages(path)
        if len(stages) != 1:
            raise ValueError(f"{path} has {len(stages)} stages; load it with load_stages()")
        return stages[0]
