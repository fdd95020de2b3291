"""Megatron-LM flags that are not fields of our config (``core_v0.16.1`` names and meanings).

A Megatron-LM launch script runs here unchanged. Each of its flags is one of:

* a config field (generated in :mod:`megatron_longctx.arguments`);
* **translated** into config fields here (``--recompute-activations``, ``--use-flash-attn``,
  the RoPE scaling flags);
* **what this model is** (``--swiglu``, ``--normalization RMSNorm``, ``--position-embedding-type
  rope``...): accepted; any other value would change the model in a way we do not implement
  and stops the run, naming the flag;
* **refused** (LayerNorm 1p, MoE, FSDP, fp16...): a clear error naming the flag;
* a GPU-only performance setting with **no effect here** (FP8 without Transformer Engine
  layers, kernel fusions we do not use, profiler and allocator knobs): accepted and listed once
  at startup, never silently.
"""

from __future__ import annotations

import argparse
from typing import Any

_FLAG = dict(action="store_true")
_VALUE = dict(type=str)

# flag -> (argparse kwargs, why it has no effect here)
NO_EFFECT: dict[str, tuple[dict, str]] = {
    **{flag: (kw, "FP8 runs in Transformer Engine layers, which this model does not build "
                  "(the local layer spec)")
       for flag, kw in (("--fp8-format", _VALUE), ("--fp8-recipe", _VALUE),
                        ("--fp8-margin", _VALUE), ("--fp8-interval", _VALUE),
                        ("--fp8-amax-history-len", _VALUE), ("--fp8-amax-compute-algo", _VALUE),
                        ("--fp8-param-gather", _FLAG),
                        ("--keep-fp8-weight-transpose-cache", _FLAG))},
    **{flag: (_FLAG, "switches off a fused kernel this model's layers never use")
       for flag in ("--no-masked-softmax-fusion", "--no-rope-fusion", "--no-bias-dropout-fusion",
                    "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
                    "--no-gradient-accumulation-fusion", "--no-persist-layer-norm")},
    "--no-async-tensor-model-parallel-allreduce": (
        _FLAG, "removed from megatron-core (its layers schedule the TP all-reduce themselves)"),
    "--cross-entropy-loss-fusion": (
        _FLAG, "megatron-core's fused softmax cross entropy is not wired; the loss is our "
               "chunked cross entropy (--cross-entropy-chunk-size) or megatron-core's unfused one"),
    "--use-contiguous-parameters-in-local-ddp": (
        _FLAG, "megatron-core's DDP always keeps parameters in contiguous buffers"),
    "--no-create-attention-mask-in-dataloader": (
        _FLAG, "no attention mask is ever built in the data pipeline here"),
    "--no-mmap-bin-files": (_FLAG, ".bin files are always memory-mapped here"),
    "--tiktoken-pattern": (_VALUE, "only for Megatron-LM's TikTokenizer, not available here"),
    "--num-dataset-builder-threads": (_VALUE, "sample indices are built by vectorised numpy"),
    "--manual-gc": (_FLAG, "Python's garbage collector keeps its default schedule"),
    "--manual-gc-interval": (_VALUE, "Python's garbage collector keeps its default schedule"),
    "--no-manual-gc-eval": (_FLAG, "Python's garbage collector keeps its default schedule"),
    "--empty-unused-memory-level": (_VALUE, "the CUDA caching allocator is not emptied "
                                            "between steps"),
    "--rerun-mode": (_VALUE, "megatron-core's rerun state machine is not used (NaN/inf losses "
                             "stop the run: --check-for-nan-in-loss-and-grad)"),
}
# Megatron-LM accepts this one with underscores (an AMD-contributed flag of train_llama3.sh)
NO_EFFECT_ALIASES = {"--keep-fp8-weight-transpose-cache": ["--keep_fp8_weight_transpose_cache"]}

# flag -> (argparse kwargs, the values that describe this model (None: a store_true flag that
# is always the case here), what to say otherwise)
MODEL_IS: dict[str, tuple[dict, set | None, str]] = {
    "--position-embedding-type": (_VALUE, {"rope"}, "the model uses rotary embeddings (pick "
                                  "the RoPE method with --rope-type)"),
    "--normalization": (_VALUE, {"RMSNorm"}, "the model is Llama-style (RMSNorm)"),
    "--swiglu": (_FLAG, None, ""),
    "--disable-bias-linear": (_FLAG, None, ""),
    "--group-query-attention": (_FLAG, None, ""),  # --num-query-groups sets the groups
    "--no-position-embedding": (_FLAG, None, ""),
    "--use-rotary-position-embeddings": (_FLAG, None, ""),
    "--use-mcore-models": (_FLAG, None, ""),
    "--log-throughput": (_FLAG, None, ""),  # TFLOP/s per GPU is always in the log line
    "--calculate-per-token-loss": (_FLAG, None, ""),  # always: the loss is per valid token
    "--attention-softmax-in-fp32": (_FLAG, None, ""),  # every attention path does it in fp32
}

# flag -> (argparse kwargs, why it is refused)
REFUSED: dict[str, tuple[dict, str]] = {
    "--apply-layernorm-1p": (_FLAG, "LayerNorm with zero-centred gamma is not implemented; the "
                                    "model is Llama-style (RMSNorm)"),
    "--add-bias-linear": (_FLAG, "linear biases are not implemented (Llama: none; Qwen2's "
                                 "QKV bias is --add-qkv-bias)"),
    "--squared-relu": (_FLAG, "the MLP is SwiGLU"),
    "--openai-gelu": (_FLAG, "the MLP is SwiGLU"),
    "--num-experts": (_VALUE, "mixture-of-experts layers are not implemented"),
    "--expert-model-parallel-size": (_VALUE, "mixture-of-experts layers are not implemented"),
    "--use-legacy-models": (_FLAG, "only megatron-core models exist here"),
    "--use-torch-fsdp2": (_FLAG, "FSDP is not implemented; shard optimizer state with "
                                 "--use-distributed-optimizer"),
    "--use-megatron-fsdp": (_FLAG, "FSDP is not implemented; shard optimizer state with "
                                   "--use-distributed-optimizer"),
    "--fp16": (_FLAG, "fp16 training (loss scaling) is not implemented; use --bf16"),
    "--decoupled-lr": (_VALUE, "a separate embedding/output learning rate is not implemented"),
    "--decoupled-min-lr": (_VALUE, "a separate embedding/output learning rate is not "
                                   "implemented"),
}

# translated into config fields by apply_megatron_flags: flag -> (argparse kwargs, help)
TRANSLATED: dict[str, tuple[dict, str]] = {
    "--recompute-activations": (_FLAG, "= --recompute-granularity selective"),
    "--use-flash-attn": (_FLAG, "= --attention-backend flash"),
    "--use-rope-scaling": (_FLAG, "Llama 3.1 scaling: --rope-type llama3 with megatron-core's "
                                  "constants (low/high frequency factors 1/4, length 8192)"),
    "--rope-scaling-factor": (dict(type=float), "its factor (default 8)"),
    "--rotary-seq-len-interpolation-factor": (dict(type=float),
                                              "= --rope-type linear --rope-factor F"),
}

_PREFIX = "megatron__"


def _dest(flag: str) -> str:
    return _PREFIX + flag.lstrip("-").replace("-", "_")


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags above, except those that config fields already define (a setting that
    gained an implementation is a field, and the field wins)."""
    group = parser.add_argument_group(
        "Megatron-LM compatibility", "accepted as in Megatron-LM core_v0.16.1; see "
        "megatron_longctx/megatron_flags.py for what each does here")
    flags = [(flag, [], kwargs, text) for flag, (kwargs, text) in TRANSLATED.items()]
    flags += [(flag, [], kwargs, f"must be {' or '.join(sorted(values))}" if values
               else "always the case here") for flag, (kwargs, values, _) in MODEL_IS.items()]
    flags += [(flag, [], kwargs, f"refused: {why}") for flag, (kwargs, why) in REFUSED.items()]
    flags += [(flag, NO_EFFECT_ALIASES.get(flag, []), kwargs, f"no effect here: {why}")
              for flag, (kwargs, why) in NO_EFFECT.items()]
    for flag, aliases, kwargs, text in flags:
        if flag not in parser._option_string_actions:
            if kwargs.get("action") != "store_true":
                kwargs = {**kwargs, "metavar": flag.lstrip("-").replace("-", "_").upper()}
            group.add_argument(flag, *aliases, dest=_dest(flag), help=text, **kwargs)


def pop_megatron_flags(given: dict[str, Any]) -> dict[str, Any]:
    """Remove this module's flags from the parsed ``given`` values; returns them by flag."""
    flags = {}
    for dest in [d for d in given if d.startswith(_PREFIX)]:
        flags["--" + dest[len(_PREFIX):].replace("_", "-")] = given.pop(dest)
    return flags


def apply_megatron_flags(cfg, flags: dict[str, Any], explicit: set[str]) -> list[str]:
    """Translate ``flags`` into ``cfg`` (a RunConfig); raise ``ValueError`` for refused ones.
    ``explicit``: config fields given on the command line (a translated flag that contradicts
    one is an error). Returns the startup lines for flags without effect here."""
    for flag, value in flags.items():
        if flag in REFUSED and value not in (False, None):
            raise ValueError(f"{flag} is not supported: {REFUSED[flag][1]}.")
        if flag in MODEL_IS:
            _, allowed, why = MODEL_IS[flag]
            if allowed is not None and value not in allowed:
                raise ValueError(f"{flag} {value} is not supported: {why}; use {flag} "
                                 f"{' or '.join(sorted(allowed))} or drop the flag.")
    if flags.get("--recompute-activations"):
        if "recompute_granularity" in explicit and \
                cfg.training.recompute_granularity != "selective":
            raise ValueError("--recompute-activations means --recompute-granularity selective; "
                             "drop one of them")
        cfg.training.recompute_granularity = "selective"
    if flags.get("--use-flash-attn"):
        if cfg.model.attention_backend not in ("auto", "flash"):
            raise ValueError(f"--use-flash-attn contradicts --attention-backend "
                             f"{cfg.model.attention_backend}; drop one of them")
        cfg.model.attention_backend = "flash"
    _rope_scaling(cfg, flags, explicit)
    notes = [f"{flag}: {NO_EFFECT[flag][1]}" for flag, value in flags.items()
             if flag in NO_EFFECT and value is not False]
    if "--rope-scaling-factor" in flags and not flags.get("--use-rope-scaling"):
        notes.append("--rope-scaling-factor: used only with --use-rope-scaling (Megatron-LM)")
    return notes


def _rope_scaling(cfg, flags: dict[str, Any], explicit: set[str]) -> None:
    """Megatron-LM's RoPE flags as our rope types: ``--use-rope-scaling`` is Llama 3.1's
    scaling (megatron-core's constants: low/high frequency factors 1 and 4, original length
    8192), ``--rotary-seq-len-interpolation-factor`` is position interpolation."""
    scaling = bool(flags.get("--use-rope-scaling"))
    interpolation = flags.get("--rotary-seq-len-interpolation-factor")
    if not scaling and interpolation is None:
        return
    if scaling and interpolation is not None:
        raise ValueError("--use-rope-scaling and --rotary-seq-len-interpolation-factor together "
                         "(scaled frequencies and interpolated positions) are not implemented; "
                         "pick one")
    wanted = "llama3" if scaling else "linear"
    rope = cfg.model.rope_parameters
    if "rope_type" in explicit and rope.get("rope_type") != wanted:
        flag = "--use-rope-scaling" if scaling else "--rotary-seq-len-interpolation-factor"
        raise ValueError(f"{flag} means --rope-type {wanted}, but --rope-type "
                         f"{rope.get('rope_type')} is given; drop one of them")
    theta = {"rope_theta": rope.get("rope_theta", 10000.0)}
    if scaling:
        cfg.model.rope_parameters = {
            "rope_type": "llama3", **theta,
            "factor": float(flags.get("--rope-scaling-factor") or 8.0),
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    else:
        cfg.model.rope_parameters = {"rope_type": "linear", **theta,
                                     "factor": float(interpolation)}
