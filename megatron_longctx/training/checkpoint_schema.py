"""What a checkpoint's metadata says, for every format we read: ours (each schema version) and
Megatron-LM's (megatron-core's stock ``GPTModel``).

``common.pt`` holds Megatron-LM's fields (``args``, ``iteration``, ``checkpoint_version``) and
megatron-core's ``content_metadata`` (``schema: megatron_longctx``, ``schema_version``, the layout
that wrote it). Our schema versions:

1. Tensor keys are the modules' ``state_dict`` names (``decoder.layers.input_layernorm.weight``,
   ``decoder.layers.pre_mlp_layernorm.weight``); ``args`` is our config (``RunConfig.to_dict()``).
   Checkpoints older than ``content_metadata`` are read as schema 1.
2. Tensor keys follow megatron-core's TE-compatible map (the norms as
   ``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` and
   ``decoder.layers.mlp.linear_fc1.layer_norm_weight``, ``model/layer_spec.py``), as in
   Megatron-LM checkpoints of either layer spec; ``args`` is an ``argparse.Namespace`` with
   Megatron-LM's names (what its ``--use-checkpoint-args`` and argument checks read) and our
   config as ``args.megatron_longctx``.

Migration: nothing is rewritten on disk. A schema-1 checkpoint is loaded by requesting its
tensors under the old keys (:func:`stored_keys`). The model's ``state_dict`` names never
changed, and the optimizer's checkpoint keys are derived from the model's, so a resume migrates
both; its next save writes schema 2. :func:`read_common` gives every reader our config dict as
``args``, whichever format wrote it; a Megatron-LM checkpoint (no schema of ours) has
TE-compatible keys and its ``args`` Namespace is translated (:func:`config_from_megatron_lm`).
Between the local and the Transformer Engine layer specs only TE's ``_extra_state`` (FP8
metadata) differs: loading tolerates its absence (:func:`drop_absent_extra_state`,
:func:`load_model_state`).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    extract_matching_values,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)

from megatron_longctx.model.layer_spec import TE_COMPATIBLE_KEYS_MAP

SCHEMA = "megatron_longctx"
SCHEMA_VERSION = 2
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current common.pt version
OUR_ARGS = "megatron_longctx"  # the attribute of ``args`` that holds our config (schema 2)
# in our config read from Megatron-LM's args: ``model.vocab_size`` is only the padded size
PADDED_VOCAB_ONLY = "vocab_size_is_padded"
_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(.*)$")
EXTRA_STATE = "_extra_state"  # torch's suffix for a module's get_extra_state()


def schema_version(common: dict) -> int:
    """The schema of a checkpoint's (raw) common state; a checkpoint that is not ours
    (Megatron-LM) has the current key names."""
    meta = common.get("content_metadata") or {}
    if meta.get("schema") == SCHEMA:
        return int(meta["schema_version"])
    return 1 if isinstance(common.get("args"), dict) else SCHEMA_VERSION


def _renamed(key: str, mapping: dict[str, str]) -> str:
    match = _LAYER_KEY.match(key)
    if match:
        for old, new in mapping.items():
            if match.group(2).startswith(old):
                return match.group(1) + new + match.group(2)[len(old):]
    return key


def current_key(key: str, version: int) -> str:
    """The key that a tensor stored under ``key`` in a schema-``version`` checkpoint has now."""
    return _renamed(key, TE_COMPATIBLE_KEYS_MAP) if version < 2 else key


def stored_keys(sharded_state_dict: dict, version: int) -> dict:
    """Rename, in place, the keys of ``sharded_state_dict`` (built by the current model) to those
    a schema-``version`` checkpoint stores its tensors under; returns it."""
    if version >= 2:
        return sharded_state_dict
    old_names = {new: old for old, new in TE_COMPATIBLE_KEYS_MAP.items()}

    def rename(item):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory, ShardedObject)):
            item.key = _renamed(item.key, old_names)
        return item

    dict_list_map_inplace(rename, sharded_state_dict)
    return sharded_state_dict


def drop_absent_extra_state(sharded_state_dict: dict, path: str) -> dict:
    """``sharded_state_dict`` without the ``_extra_state`` objects that the checkpoint in
    ``path`` does not hold.

    Transformer Engine's modules keep FP8 scaling metadata as ``_extra_state``. megatron-core's
    linears save one under the same key in both specs (None in the local ones), but a model
    built with the TE spec asks for more (its final ``TENorm``'s) than a local-spec checkpoint
    (ours or Megatron-LM's) holds, and megatron-core's loader fails on a requested key it
    cannot find. TE starts that state afresh (nothing to restore in bf16)."""
    def requested(v) -> bool:
        return isinstance(v, ShardedObject) and v.key.endswith(EXTRA_STATE)

    if not any(requested(v) for v in nested_values(sharded_state_dict)):
        return sharded_state_dict
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved = {v.key for v in load_sharded_metadata(path).values()}
    _, kept = extract_matching_values(sharded_state_dict,
                                      lambda v: requested(v) and v.key not in saved)
    return kept


def load_model_state(model, state: dict) -> None:
    """``model.load_state_dict(state)``, strict except for ``_extra_state`` entries (Transformer
    Engine's, absent from local-spec checkpoints: see :func:`drop_absent_extra_state`; stock
    TE specs keep attention's at ``core_attention._extra_state``, ours one level down)."""
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = ([k for k in keys if not k.endswith(EXTRA_STATE)]
                           for keys in (result.missing_keys, result.unexpected_keys))
    if missing or unexpected:
        raise RuntimeError(f"the loaded state does not fit {type(model).__name__}: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")


def vocabulary_fits(saved_args: dict, vocab: int) -> bool:
    """Whether a tokenizer of ``vocab`` tokens is the one checkpoint args ``saved_args`` were
    trained with: the same vocabulary, or for a Megatron-LM checkpoint (whose args hold only the
    padded size) one that pads to the same rows (Megatron-LM's rule, DECISIONS.md 1)."""
    from megatron_longctx.model.gpt import padded_vocab_size

    model = saved_args.get("model") or {}
    saved = model.get("vocab_size")
    if saved is None:
        return True
    if not saved_args.get(PADDED_VOCAB_ONLY):
        return saved == vocab
    tp = (saved_args.get("parallel") or {}).get("tensor_model_parallel_size", 1)
    return vocab <= saved and \
        padded_vocab_size(vocab, tp, model.get("make_vocab_size_divisible_by", 128)) == saved


def read_common(raw: dict) -> dict:
    """A checkpoint's common state with ``args`` as our config dict (``{"model": ...}``) and its
    ``schema_version``; a Megatron-LM ``args`` Namespace is kept as ``megatron_lm_args``."""
    common = dict(raw)
    common["schema_version"] = schema_version(raw)
    if common["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"the checkpoint was written by a newer megatron_longctx (checkpoint "
                         f"schema {common['schema_version']}; this version reads up to "
                         f"{SCHEMA_VERSION}): update megatron_longctx to load it")
    args = raw.get("args")
    if isinstance(args, argparse.Namespace):
        common["megatron_lm_args"] = args
        ours = getattr(args, OUR_ARGS, None)
        common["args"] = ours if isinstance(ours, dict) else config_from_megatron_lm(args)
    return common


# ---- writing: Megatron-LM's names for our config ---------------------------------------------

def megatron_lm_args(cfg: dict, iteration: int, world_size: int, *, save_optim: bool,
                     save_rng: bool) -> argparse.Namespace:
    """``args`` of a checkpoint: Megatron-LM's names for the model, layout and batch, and our
    whole config (``cfg``: ``RunConfig.to_dict()``) as ``args.megatron_longctx``. The layout is
    the config's (``parallel``), which the vocabulary padding follows: the one that wrote the
    checkpoint, or the one a merge padded it for.

    RoPE: Megatron-LM has the default, Llama 3.1 scaling (``use_rope_scaling``) and linear
    position interpolation; other methods (YaRN, LongRoPE, HARPE...) are written as their base
    ``rotary_base`` only (Megatron-LM would apply plain RoPE; weights are unaffected)."""
    from megatron_longctx.config import RunConfig
    from megatron_longctx.model.gpt import padded_vocab_size

    # a config written by an older version may lack newer fields: their defaults
    model = RunConfig.from_dict({"model": cfg["model"]}).model
    training, data, parallel = (cfg.get(s) or {} for s in ("training", "data", "parallel"))
    rope = model.rope_parameters
    rope_type = rope.get("rope_type", "default")
    tp, pp, cp = (parallel.get(f"{kind}_model_parallel_size", 1)
                  for kind in ("tensor", "pipeline", "context"))
    dp = max(world_size // (tp * pp * cp), 1)
    gbs = training.get("global_batch_size")
    return argparse.Namespace(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
        group_query_attention=model.query_groups != model.num_attention_heads,
        num_query_groups=model.query_groups, kv_channels=model.head_dim,
        max_position_embeddings=model.max_position_embeddings,
        seq_length=training.get("seq_length"),
        position_embedding_type="rope", add_position_embedding=False,
        use_rotary_position_embeddings=True, rotary_base=rope.get("rope_theta", 10000.0),
        rotary_percent=model.rotary_percent, rotary_interleaved=model.rotary_interleaved,
        use_rope_scaling=rope_type == "llama3",
        rope_scaling_factor=rope.get("factor", 8.0) if rope_type == "llama3" else 8.0,
        rotary_seq_len_interpolation_factor=rope.get("factor") if rope_type == "linear" else None,
        normalization="RMSNorm", norm_epsilon=model.norm_epsilon, apply_layernorm_1p=False,
        swiglu=True, squared_relu=False, add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias, qk_layernorm=False, num_experts=None,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        attention_dropout=model.attention_dropout, hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        padded_vocab_size=padded_vocab_size(model.vocab_size, tp,
                                            model.make_vocab_size_divisible_by),
        tokenizer_type=data.get("tokenizer_type"), tokenizer_model=data.get("tokenizer_model"),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, world_size=dp * tp * pp * cp, data_parallel_size=dp,
        micro_batch_size=training.get("micro_batch_size"), global_batch_size=gbs,
        consumed_train_samples=iteration * gbs if gbs else 0, consumed_valid_samples=0,
        ckpt_format="torch_dist", no_save_optim=not save_optim, no_save_rng=not save_rng,
        **{OUR_ARGS: cfg},
    )


# ---- reading: our config from Megatron-LM's args --------------------------------------------

# model fields with the same name and meaning in Megatron-LM's args
_SAME_NAME = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "kv_channels", "max_position_embeddings", "norm_epsilon", "add_qkv_bias",
              "untie_embeddings_and_output_weights", "init_method_std", "rotary_percent",
              "rotary_interleaved", "make_vocab_size_divisible_by", "attention_dropout",
              "hidden_dropout")
# Megatron-LM's defaults (core_v0.16.1) for what an args Namespace may lack
_DEFAULTS = {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
             "swiglu": False, "add_bias_linear": True, "rotary_base": 10000}


def config_from_megatron_lm(args: argparse.Namespace) -> dict:
    """Our config (the ``model``, ``training``, ``parallel`` and tokenizer settings) from the
    ``args`` of a Megatron-LM checkpoint; ``ValueError`` for a model this code does not build
    (the same refusals as Megatron-LM's flags on our command line, ``megatron_flags.py``).

    The unpadded vocabulary is not in Megatron-LM's args: ``padded_vocab_size`` (the rows the
    checkpoint holds) is taken as the vocabulary, marked ``PADDED_VOCAB_ONLY`` (see
    :func:`vocabulary_fits`)."""
    from megatron_longctx.config import RunConfig
    from megatron_longctx.megatron_flags import apply_megatron_flags

    def get(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return _DEFAULTS.get(name, default) if value is None else value

    if not get("swiglu"):
        raise ValueError("Megatron-LM checkpoint args: swiglu=False is not supported: the MLP is "
                         "SwiGLU")
    for name in ("qk_layernorm", "multi_latent_attention"):
        if get(name):
            raise ValueError(f"Megatron-LM checkpoint args: {name}=True is not supported")
    if get("padded_vocab_size") is None:
        raise ValueError("Megatron-LM checkpoint args lack padded_vocab_size (the vocabulary)")
    cfg = RunConfig()
    model = cfg.model
    for name in _SAME_NAME:
        if getattr(args, name, None) is not None:
            setattr(model, name, getattr(args, name))
    model.num_query_groups = get("num_query_groups") if get("group_query_attention") else None
    model.vocab_size = int(get("padded_vocab_size"))
    model.rope_parameters = {"rope_type": "default", "rope_theta": float(get("rotary_base"))}
    flags = {"--position-embedding-type": get("position_embedding_type"),
             "--normalization": get("normalization"),
             "--add-bias-linear": get("add_bias_linear"),
             "--apply-layernorm-1p": get("apply_layernorm_1p", False),
             "--squared-relu": get("squared_relu", False),
             "--num-experts": get("num_experts"),
             "--use-rope-scaling": get("use_rope_scaling", False),
             "--rope-scaling-factor": get("rope_scaling_factor"),
             "--rotary-seq-len-interpolation-factor": get("rotary_seq_len_interpolation_factor")}
    try:
        apply_megatron_flags(cfg, flags, explicit=set())
    except ValueError as err:
        raise ValueError(f"Megatron-LM checkpoint args: {err}") from None
    model.validate()
    result = {"model": cfg.to_dict()["model"], PADDED_VOCAB_ONLY: True}
    # what else our readers use (--use-checkpoint-args, the resume checks, the tools' defaults)
    for section, names in (("training", ("seq_length", "micro_batch_size", "global_batch_size")),
                           ("parallel", ("tensor_model_parallel_size",
                                         "pipeline_model_parallel_size",
                                         "context_parallel_size")),
                           ("data", ("tokenizer_type", "tokenizer_model"))):
        result[section] = {n: getattr(args, n) for n in names
                           if getattr(args, n, None) is not None}
    return result
