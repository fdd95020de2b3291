"""Full (unsharded) tensors: ours <-> Hugging Face Llama / Mistral / Qwen2 names.

Our names are megatron-core's: a fused ``linear_qkv`` laid out per KV group as
``[q heads of the group; k; v]`` and a fused SwiGLU ``linear_fc1`` as ``[gate; up]``. Both
sides rotate with the half-split convention (``rotary_interleaved=False``), so no q/k
permutation is needed. Use :mod:`megatron_longctx.model.sharding` to go between full tensors
and a parallel layout, and :mod:`megatron_longctx.convert` for configs and files.

The mapping works one layer at a time (``get`` reads one tensor by name), so conversions hold
one layer, never the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megatron_longctx.config import ModelConfig

_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


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


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a transformers checkpoint of ``model`` holds, with its shape."""
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    q, kv = model.num_attention_heads * d, model.query_groups * d
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h), "model.norm.weight": (h,)}
    if model.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
                 "mlp.down_proj.weight": (h, f)}
        shapes.update({p + name: shape for name, shape in layer.items()})
        if model.add_qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


Getter = Callable[[str], Tensor]


def layer_to_hf(get: Getter, i: int, model: ModelConfig) -> dict[str, Tensor]:
    """Layer ``i``: our full tensors (read with ``get``) -> HF names."""
    ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {hf + dst: get(ours + src) for src, dst in _LAYER_MAP.items()}
    for kind in ("weight", "bias") if model.add_qkv_bias else ("weight",):
        q, k, v = _split_qkv(get(ours + f"self_attention.linear_qkv.{kind}"), model)
        out.update({hf + f"self_attn.q_proj.{kind}": q, hf + f"self_attn.k_proj.{kind}": k,
                    hf + f"self_attn.v_proj.{kind}": v})
    gate, up = get(ours + "mlp.linear_fc1.weight").chunk(2, dim=0)
    out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


def embeddings_to_hf(get: Getter, model: ModelConfig) -> dict[str, Tensor]:
    """Embedding, final norm and (untied) output layer -> HF names, vocab padding dropped."""
    vocab = model.vocab_size
    out = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:vocab],
           "model.norm.weight": get("decoder.final_layernorm.weight")}
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = get("output_layer.weight")[:vocab]
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_hf(get: Getter, i: int, model: ModelConfig) -> dict[str, Tensor]:
    """Layer ``i``: HF tensors (read with ``get``) -> our full tensors."""
    ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {ours + dst: get(hf + src) for dst, src in _LAYER_MAP.items()}
    for kind in ("weight", "bias") if model.add_qkv_bias else ("weight",):
        out[ours + f"self_attention.linear_qkv.{kind}"] = _fuse_qkv(
            *(get(hf + f"self_attn.{p}_proj.{kind}") for p in "qkv"), model)
    out[ours + "mlp.linear_fc1.weight"] = torch.cat(
        [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
    return out


def embeddings_from_hf(get: Getter, model: ModelConfig, padded_vocab: int
                       ) -> dict[str, Tensor]:
    """Embedding, final norm and output layer (vocab padded with zero rows).

    ``output_layer.weight`` is always given: with tied embeddings and PP > 1, megatron-core
    still allocates it on the last stage (a copy kept equal to the embedding)."""

    def pad(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])

    embedding = pad(get("model.embed_tokens.weight"))
    output = (pad(get("lm_head.weight")) if model.untie_embeddings_and_output_weights
              else embedding)
    return {"embedding.word_embeddings.weight": embedding,
            "decoder.final_layernorm.weight": get("model.norm.weight"),
            "output_layer.weight": output}


def to_hf(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    """Our full state dict -> HF names (padded vocab rows dropped)."""
    out = embeddings_to_hf(state.__getitem__, model)
    for i in range(model.num_layers):
        out.update(layer_to_hf(state.__getitem__, i, model))
    return out


def from_hf(hf_state: dict[str, Tensor], model: ModelConfig, padded_vocab: int
            ) -> dict[str, Tensor]:
    """HF state dict -> our full state dict (vocab padded with zero rows; ``output_layer``
    present also when tied, see :func:`embeddings_from_hf`)."""
    out = embeddings_from_hf(hf_state.__getitem__, model, padded_vocab)
    for i in range(model.num_layers):
        out.update(layer_from_hf(hf_state.__getitem__, i, model))
    return out
