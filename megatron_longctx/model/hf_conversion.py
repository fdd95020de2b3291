"""Full (unsharded) state dicts: ours <-> Hugging Face ``LlamaForCausalLM``.

Our names are megatron-core's: a fused ``linear_qkv`` laid out per KV group as
``[q heads of the group; k; v]`` and a fused SwiGLU ``linear_fc1`` as ``[gate; up]``. Both
sides rotate with the half-split convention (``rotary_interleaved=False``), so no q/k
permutation is needed. Use :mod:`megatron_longctx.model.sharding` to go between full tensors
and a parallel layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron_longctx.config import ModelConfig
from megatron_longctx.rope.methods import ntk_base

_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def hf_rope_parameters(model: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` for a transformers config; ``ntk`` becomes ``default`` with the
    enlarged base. HARPE has no transformers equivalent."""
    params = dict(model.rope_parameters)
    rope_type = params.get("rope_type", "default")
    if rope_type == "harpe":
        raise ValueError("HARPE (per-head bases) has no transformers rope_type; keep the "
                         "checkpoint in megatron_longctx format")
    if params.pop("longrope_start_tokens", 0):
        raise ValueError("transformers' longrope has no unscaled first n-hat positions "
                         "(longrope_start_tokens); the exported model would differ there")
    if rope_type == "ntk":
        dim = int(model.head_dim * model.rotary_percent)
        params = {"rope_type": "default",
                  "rope_theta": ntk_base(params.get("rope_theta", 10000.0), params["factor"], dim)}
    if model.rotary_percent != 1.0:
        params["partial_rotary_factor"] = model.rotary_percent
    return params


def hf_config(model: ModelConfig):
    from transformers import LlamaConfig

    if model.rotary_interleaved:
        raise ValueError("transformers' Llama rotates half-split pairs; rotary_interleaved=True "
                         "checkpoints need their q/k rows permuted first")
    rope_parameters = hf_rope_parameters(model)
    max_positions = model.max_position_embeddings
    if rope_parameters["rope_type"] == "dynamic":
        # transformers' dynamic NTK reads the pretrained length from max_position_embeddings
        max_positions = rope_parameters.pop("original_max_position_embeddings")
    return LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        head_dim=model.head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=model.norm_epsilon,
        rope_parameters=rope_parameters,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        attention_bias=model.add_qkv_bias,
        mlp_bias=False,
    )


def _split_qkv(qkv: Tensor, model: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    groups, d = model.query_groups, model.head_dim
    per_group = model.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * d, *qkv.shape[1:])
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]),
            v.reshape(-1, *qkv.shape[1:]))


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, model: ModelConfig) -> Tensor:
    groups, d = model.query_groups, model.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)
    k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def to_hf(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    """Our full state dict -> HF Llama names (padded vocab rows dropped)."""
    vocab = model.vocab_size
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab]
    for i in range(model.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        for src, dst in _LAYER_MAP.items():
            out[hf + dst] = state[ours + src]
        for kind in ("weight", "bias"):
            key = ours + f"self_attention.linear_qkv.{kind}"
            if key in state:
                q, k, v = _split_qkv(state[key], model)
                out.update({hf + f"self_attn.q_proj.{kind}": q, hf + f"self_attn.k_proj.{kind}": k,
                            hf + f"self_attn.v_proj.{kind}": v})
        gate, up = state[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf_state: dict[str, Tensor], model: ModelConfig, padded_vocab: int
            ) -> dict[str, Tensor]:
    """HF Llama state dict -> our full state dict (vocab padded with zero rows)."""

    def pad(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])

    out = {"embedding.word_embeddings.weight": pad(hf_state["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf_state["model.norm.weight"]}
    if model.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = pad(hf_state.get("lm_head.weight",
                                                      hf_state["model.embed_tokens.weight"]))
    for i in range(model.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        for dst, src in _LAYER_MAP.items():
            out[ours + dst] = hf_state[hf + src]
        for kind in ("weight", "bias"):
            if hf + f"self_attn.q_proj.{kind}" in hf_state:
                out[ours + f"self_attention.linear_qkv.{kind}"] = _fuse_qkv(
                    *(hf_state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"), model)
        out[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[hf + "mlp.gate_proj.weight"], hf_state[hf + "mlp.up_proj.weight"]])
    return out

