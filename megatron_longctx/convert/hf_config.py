"""Hugging Face ``config.json`` <-> our :class:`ModelConfig`, RoPE included, both ways.

Import reads the raw JSON (either the current ``rope_parameters`` spelling or the older
``rope_theta`` + ``rope_scaling``), so every refusal happens before a tensor is read. Export
builds transformers' own config class, so what we write is what transformers validates.

Where the two sides keep lengths differently:

* ``dynamic``: transformers reads the pretrained length from ``max_position_embeddings``; ours
  keeps it as ``original_max_position_embeddings`` (and ``max_position_embeddings`` equal to it).
* ``yarn``/``longrope`` without ``factor``: both use ``max_position_embeddings / original``; we
  write the factor explicitly both ways (an implicit factor depends on a field that extension
  runs change).
* ``ntk`` (ours only) exports as ``default`` with the enlarged base; ``harpe`` (ours only)
  exports as ``default`` with the first base plus ``harpe_bases`` at the top level of
  config.json, which stock transformers ignores (a warning says so).
"""

from __future__ import annotations

import warnings
from typing import Any

from megatron_longctx.config import ModelConfig
from megatron_longctx.rope.harpe import harpe_bases
from megatron_longctx.rope.methods import RopeContext, ntk_base, parse_rope_parameters

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
_BY_CLASS = {cls: name for name, cls in ARCHITECTURES.items()}
# rope_parameters keys each transformers rope_type reads (besides rope_type/rope_theta)
_HF_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),  # transformers ignores the latter
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "attention_factor", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "factor", "attention_factor",
                 "original_max_position_embeddings"),
}


class ConversionError(ValueError):
    """An input or model the conversion refuses; raised before anything is written."""


def architecture_of(hf: dict[str, Any]) -> str:
    """``llama`` / ``mistral`` / ``qwen2`` from ``architectures`` (or ``model_type``)."""
    classes = hf.get("architectures") or []
    for cls in classes:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    if not classes and hf.get("model_type") in ARCHITECTURES:
        return hf["model_type"]
    raise ConversionError(
        f"unsupported architecture {classes or hf.get('model_type')!r}; supported: "
        f"{', '.join(ARCHITECTURES.values())}")


# -- import --------------------------------------------------------------------------------


def _check_sliding_window(hf: dict[str, Any], arch: str) -> None:
    window, max_pos = hf.get("sliding_window"), hf.get("max_position_embeddings")
    if arch == "qwen2" and not hf.get("use_sliding_window", False):
        return  # Qwen2 applies sliding_window only with use_sliding_window
    if arch in ("qwen2", "mistral") and window is not None and (max_pos is None
                                                               or window < max_pos):
        raise ConversionError(
            f"{ARCHITECTURES[arch]} config enables a sliding window of {window} tokens "
            f"(max_position_embeddings {max_pos}); our attention is full causal, so the "
            f"converted model would differ. Set sliding_window to null (and "
            f"use_sliding_window to false) if the model was trained without one.")


def rope_from_hf(hf: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Our ``rope_parameters`` and ``max_position_embeddings`` from a transformers config."""
    raw = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in raw.values()):
        raise ConversionError("rope_parameters nested per layer type are not supported")
    params = {k: v for k, v in raw.items() if k not in ("type", "rope_type")}
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0, 1):
        raise ConversionError(f"partial_rotary_factor={partial}: Llama, Mistral and Qwen2 "
                              f"rotate the whole head; partial rotary is not supported")
    if rope_type not in _HF_ROPE_KEYS:
        raise ConversionError(f"rope type {rope_type!r} is not supported; supported: "
                              f"{sorted(_HF_ROPE_KEYS)}")
    unknown = sorted(set(params) - set(_HF_ROPE_KEYS[rope_type]) - {"rope_theta"})
    if unknown:
        raise ConversionError(f"rope_parameters {unknown} do not apply to rope_type "
                              f"{rope_type!r} (it takes {list(_HF_ROPE_KEYS[rope_type])})")
    max_pos = int(hf["max_position_embeddings"])
    ours = {"rope_type": rope_type,
            "rope_theta": float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type in ("yarn", "llama3", "longrope"):
        # transformers: a top-level original_max_position_embeddings wins (Phi-3), then the
        # rope dict's, then max_position_embeddings
        original = hf.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings") or max_pos
        params["original_max_position_embeddings"] = int(original)
        if rope_type != "llama3" and params.get("factor") is None:
            params["factor"] = max_pos / original
    elif rope_type == "dynamic":
        params["original_max_position_embeddings"] = max_pos  # what transformers reads
    ours.update({k: v for k, v in params.items() if v is not None})
    return ours, max_pos


def model_config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str]:
    """Our model config (unpadded vocabulary) and the architecture of a ``config.json``."""
    arch = architecture_of(hf)
    _check_sliding_window(hf, arch)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is "
                              f"supported")
    if hf.get("mlp_bias"):
        raise ConversionError("mlp_bias=true is not supported (our MLP has no biases)")
    if arch == "llama" and hf.get("attention_bias"):
        raise ConversionError("Llama with attention_bias=true has an o_proj bias, which our "
                              "model lacks; only q/k/v biases (Qwen2) are supported")
    rope, max_pos = rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    model = ModelConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=max_pos,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=arch == "qwen2",
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        rope_parameters=rope,
    )
    try:
        model.validate()
    except ValueError as err:
        raise ConversionError(f"the converted config is invalid: {err}") from None
    return model, arch


# -- export --------------------------------------------------------------------------------


def resolve_architecture(model: ModelConfig, architecture: str = "auto",
                         source: str | None = None) -> str:
    """The export architecture: ``auto`` is ``source`` (the HF model it came from) when that
    fits, else Qwen2 for q/k/v biases and Llama otherwise."""
    if architecture == "auto":
        if source in ARCHITECTURES and (source == "qwen2") == model.add_qkv_bias:
            architecture = source
        else:
            architecture = "qwen2" if model.add_qkv_bias else "llama"
    if architecture not in ARCHITECTURES:
        raise ConversionError(f"--architecture {architecture!r}: choose auto, "
                              f"{', '.join(ARCHITECTURES)}")
    if model.add_qkv_bias and architecture != "qwen2":
        raise ConversionError(f"this model has q/k/v biases (--add-qkv-bias): export it as "
                              f"qwen2; {ARCHITECTURES[architecture]} has none (Llama's "
                              f"attention_bias would also add an o_proj bias)")
    if not model.add_qkv_bias and architecture == "qwen2":
        raise ConversionError("Qwen2 has q/k/v biases; this model has none (export it as "
                              "llama or mistral)")
    if architecture == "qwen2" and model.head_dim * model.num_attention_heads != \
            model.hidden_size:
        raise ConversionError(f"Qwen2 has no head_dim setting: kv_channels {model.head_dim} "
                              f"must equal hidden_size / num_attention_heads")
    return architecture


def _harpe_bases(model: ModelConfig) -> list[float]:
    """The explicit per-KV-group bases (a scheme resolved as the model resolves it)."""
    ctx = RopeContext(model.head_dim, model.query_groups)
    _, p = parse_rope_parameters(model.rope_parameters, ctx)
    if p.harpe_bases is not None:
        return [float(b) for b in p.harpe_bases]
    return [float(b) for b in harpe_bases(p.harpe_scheme, model.query_groups, p.harpe_base_min,
                                          p.harpe_base_max, p.harpe_stride, ctx.dim)]


def rope_to_hf(model: ModelConfig) -> tuple[dict[str, Any], int, list[float] | None]:
    """transformers ``rope_parameters``, ``max_position_embeddings`` and HARPE bases (or
    None) for our model. Refuses what transformers would compute differently."""
    if model.rotary_percent != 1.0:
        raise ConversionError(
            f"rotary_percent={model.rotary_percent}: transformers' Llama, Mistral and Qwen2 "
            f"rotate the whole head (no partial rotary), so the exported model would differ")
    if model.rotary_interleaved:
        raise ConversionError("transformers rotates half-split pairs; rotary_interleaved "
                              "models need their q/k rows permuted first (not supported)")
    params = dict(model.rope_parameters)
    rope_type = params.pop("rope_type", "default")
    max_pos = model.max_position_embeddings
    harpe = None
    if rope_type == "harpe":
        harpe = _harpe_bases(model)
        warnings.warn("HARPE: per-head RoPE bases are written as 'harpe_bases' in config.json; "
                      "stock transformers ignores them and applies rope_theta (the first "
                      "base) to every head", stacklevel=2)
        return {"rope_type": "default", "rope_theta": harpe[0]}, max_pos, harpe
    theta = float(params.pop("rope_theta", 10000.0))
    if rope_type == "ntk":
        return ({"rope_type": "default",
                 "rope_theta": ntk_base(theta, params["factor"], model.head_dim)}, max_pos, None)
    if rope_type == "longrope" and params.pop("longrope_start_tokens", 0):
        raise ConversionError(
            f"LongRoPE with longrope_start_tokens (n-hat) = "
            f"{model.rope_parameters['longrope_start_tokens']}: transformers' longrope "
            f"scales every position, so the first n-hat positions would differ")
    if rope_type == "dynamic":
        max_pos = int(params.pop("original_max_position_embeddings"))
    if rope_type in ("yarn", "longrope") and params.get("factor") is None:
        params["factor"] = max_pos / params["original_max_position_embeddings"]
    if rope_type == "yarn" and params.get("truncate", True):
        params.pop("truncate", None)  # transformers' default; older versions reject the key
    return {"rope_type": rope_type, "rope_theta": theta, **params}, max_pos, harpe


def hf_config(model: ModelConfig, architecture: str = "llama"):
    """transformers' config object (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``)."""
    import transformers

    architecture = resolve_architecture(model, architecture)
    rope, max_pos, harpe = rope_to_hf(model)
    kwargs = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        max_position_embeddings=max_pos,
        rms_norm_eps=model.norm_epsilon,
        initializer_range=model.init_method_std,
        rope_parameters=rope,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        hidden_act="silu",
    )
    if architecture == "llama":
        kwargs.update(head_dim=model.head_dim, attention_bias=False, mlp_bias=False)
    elif architecture == "mistral":
        kwargs.update(head_dim=model.head_dim, sliding_window=None)
    else:
        kwargs.update(use_sliding_window=False, sliding_window=None)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[architecture]
    config = cls(**kwargs)
    config.architectures = [ARCHITECTURES[architecture]]
    if harpe is not None:
        config.harpe_bases = harpe
    return config
