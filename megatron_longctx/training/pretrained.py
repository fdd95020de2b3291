"""Starting a run from another run's weights: shape checks, checkpoint args, RoPE changes.

Loading weights trained with other RoPE settings is the normal case of context extension (RoPE
has no weights); loading tensors of another shape is a mistake, reported before any training
with the flag to change.
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from megatron_longctx.config import ModelConfig, RunConfig

logger = logging.getLogger(__name__)

# model fields that --use-checkpoint-args takes from the checkpoint: the tensor shapes and the
# architecture; RoPE and max_position_embeddings stay this run's (that is what extension changes)
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "norm_epsilon", "add_qkv_bias",
                "untie_embeddings_and_output_weights", "rotary_percent", "rotary_interleaved")

# parameter-name fragment -> the flags that set its shape
_SHAPE_FLAGS = (
    ("word_embeddings", "--hidden-size, or the tokenizer (vocabulary size)"),
    ("output_layer", "--hidden-size, the tokenizer (vocabulary size) or "
                     "--untie-embeddings-and-output-weights"),
    ("linear_qkv.bias", "--add-qkv-bias"),
    ("linear_qkv", "--hidden-size, --num-attention-heads, --num-query-groups or --kv-channels"),
    ("linear_proj", "--hidden-size, --num-attention-heads or --kv-channels"),
    ("linear_fc1", "--hidden-size or --ffn-hidden-size"),
    ("linear_fc2", "--hidden-size or --ffn-hidden-size"),
    ("layernorm", "--hidden-size"),
    ("final_layernorm", "--hidden-size"),
)


def _flags_for(key: str) -> str:
    return next((flags for fragment, flags in _SHAPE_FLAGS if fragment in key), "the model flags")


def _padding_rows_differ(key: str, have: tuple, want: tuple, vocab: int | None) -> bool:
    """Embedding/output rows that differ only in Megatron-LM's vocabulary padding (another TP
    size or --make-vocab-size-divisible-by): megatron-core marks these tensors
    ``allow_shape_mismatch`` and loads the rows both have, zero-filling the rest, so the
    padding is trimmed or extended and every real token row is kept."""
    return (key.endswith(("word_embeddings.weight", "output_layer.weight")) and vocab is not None
            and have[1:] == want[1:] and min(have[0], want[0]) >= vocab)


def check_checkpoint_shapes(model, path: str, keys_version: int | None = None) -> None:
    """Raise ``ValueError`` when the checkpoint in ``path`` cannot fill ``model``: a missing
    tensor or a different global shape, naming the flag to change. Vocabulary padding may
    differ (see ``_padding_rows_differ``). ``keys_version``: the checkpoint's schema version
    (default: read from it), which says under which keys it stores the tensors."""
    from megatron_longctx.training.checkpoint import load_common
    from megatron_longctx.training.checkpoint_schema import stored_keys

    if keys_version is None:
        keys_version = load_common(path)["schema_version"]
    saved = dist_checkpointing.load_tensors_metadata(path)
    wanted = stored_keys(model.sharded_state_dict(), keys_version)
    apply_factories(wanted)  # e.g. the SwiGLU fc1 as the one tensor it is saved as
    items = {v.key: v for v in nested_values(wanted) if isinstance(v, ShardedTensor)}
    vocab = getattr(model, "unpadded_vocab_size", None)
    problems, padding = [], []
    for item in items.values():
        if item.key not in saved:
            problems.append(f"{item.key} is not in the checkpoint (set by {_flags_for(item.key)})")
            continue
        have, want = tuple(saved[item.key].global_shape), tuple(item.global_shape)
        if have != want and _padding_rows_differ(item.key, have, want, vocab):
            padding.append(f"{item.key}: {have[0]} rows in the checkpoint, {want[0]} here "
                           f"(vocabulary {vocab}): padding rows "
                           f"{'trimmed' if have[0] > want[0] else 'added (zeros)'}")
        elif have != want:
            hint = ("--num-layers" if item.key.startswith("decoder.layers.")
                    and have[1:] == want[1:] else _flags_for(item.key))
            problems.append(f"{item.key}: checkpoint {have}, this run {want} (change {hint})")
    if dist.is_initialized():  # each pipeline stage checks its own tensors: all raise together
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (problems, padding))
        problems = list(dict.fromkeys(p for rank_lists in gathered for p in rank_lists[0]))
        padding = list(dict.fromkeys(p for rank_lists in gathered for p in rank_lists[1]))
    if padding and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.info("vocabulary padding differs from the checkpoint's:\n  %s",
                    "\n  ".join(padding))
    if problems:
        raise ValueError(
            f"the checkpoint {path} does not fit this model:\n  " + "\n  ".join(problems[:8])
            + ("\n  ..." if len(problems) > 8 else "")
            + "\nFix the flags above, or pass --use-checkpoint-args to take the model shape from "
              "the checkpoint.")


def _shape_differences(saved: dict, model: ModelConfig) -> list[str]:
    """``--flag saved there, current here`` for each shape setting that differs; a derived value
    (head dim, KV groups) only when the settings it derives from agree, so a changed
    ``--hidden-size`` is reported once, as itself."""
    differ = []

    def compare(name: str, there, here) -> None:
        if there is not None and there != here:
            differ.append(f"--{name.replace('_', '-')} {there} there, {here} here")

    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "add_qkv_bias", "untie_embeddings_and_output_weights"):
        compare(name, saved.get(name), getattr(model, name))
    heads = saved.get("num_attention_heads")
    if heads and heads == model.num_attention_heads:
        compare("num_query_groups", saved.get("num_query_groups") or heads, model.query_groups)
        hidden = saved.get("hidden_size")
        if hidden and hidden == model.hidden_size:
            compare("kv_channels", saved.get("kv_channels") or hidden // heads, model.head_dim)
    return differ


def check_saved_shape(saved_args: dict, model: ModelConfig, path: str) -> None:
    """One line naming each shape flag that differs from the checkpoint's stored config,
    before any data or model work (``check_checkpoint_shapes`` then compares the tensors
    themselves, also for checkpoints without a stored config)."""
    differ = _shape_differences(saved_args.get("model") or {}, model)
    if differ:
        raise ValueError(f"{path} holds a model of another shape ({'; '.join(differ)}): give "
                         f"the checkpoint's values, or pass --use-checkpoint-args to take them "
                         f"from it")


def apply_checkpoint_args(cfg: RunConfig, saved_args: dict) -> None:
    """``--use-checkpoint-args``: the model shape of the checkpoint replaces this run's."""
    saved_model = saved_args.get("model") or {}
    for name in SHAPE_FIELDS:
        if name in saved_model and getattr(cfg.model, name) != saved_model[name]:
            logger.info("--use-checkpoint-args: %s = %s (was %s)", name, saved_model[name],
                        getattr(cfg.model, name))
            setattr(cfg.model, name, saved_model[name])


def describe_rope(rope: dict) -> str:
    """``default θ=10000`` / ``yarn θ=10000 factor=8 ...``: one short line."""
    rope = dict(rope)
    kind = rope.pop("rope_type", "default")
    theta = rope.pop("rope_theta", None)
    parts = [kind] + ([f"θ={theta:g}"] if theta is not None else [])
    for key, value in rope.items():
        if isinstance(value, list):
            value = f"[{len(value)} values]"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def rope_change(saved_args: dict, model: ModelConfig) -> str | None:
    """The log line for a run whose RoPE differs from its checkpoint's, else None."""
    saved = (saved_args.get("model") or {}).get("rope_parameters")
    if not saved or saved == model.rope_parameters:
        return None
    return (f"rope: checkpoint {describe_rope(saved)} → this run "
            f"{describe_rope(model.rope_parameters)}")
