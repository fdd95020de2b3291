"""Weighted averages of checkpoints of one model: LongRecipe's merge after replay
(``θ = 0.5·θ_extended + 0.5·θ_replayed``, METHODS.md §3), model soups.

A megatron-core dist checkpoint holds global tensors, whatever TP/PP layout wrote it; the
layer tensors are stacked (``decoder.layers.*`` has the layer index as its first axis). The
merge reads them a piece at a time (one layer of one stacked tensor, or one other tensor),
from each input in turn, accumulates ``Σ w_i · θ_i`` (in float64, or float32 for 16-bit
inputs) and keeps the result in a file-backed scratch tensor under the output directory (page
cache, not process memory; the conversion's scheme). So the process holds one piece of one input
plus its accumulator, never a whole model (``benchmarks/merge_memory.py``); the scratch files
(the merged model's size) are deleted once the checkpoint is written.

The vocabulary rows: inputs may pad the embedding and output layer differently (Megatron-LM's
padding grows with TP, DECISIONS.md 1); only the real rows (``args.model.vocab_size``) are
merged, and the result is padded with zero rows for the chosen ``tp`` (as a conversion pads).
The result is a weights-only checkpoint (``iter_0000000``) with the first input's ``args``
(its ``parallel`` section set to the chosen layout), which ``load_model``,
``--pretrained-checkpoint`` and the converters read at any layout.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

logger = logging.getLogger(__name__)

# rows = the (padded) vocabulary: megatron-core GPTModel's names, the same in every layer spec
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# what a training checkpoint holds besides the model
NON_MODEL_PREFIXES = ("optimizer.", "rng_state")
# model settings that must agree for an average to mean anything (tensor shapes, vocabulary)
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "vocab_size", "add_qkv_bias",
                "untie_embeddings_and_output_weights")
ROPE_FIELDS = ("rope_parameters", "rotary_percent", "rotary_interleaved")


class MergeError(ValueError):
    """Inputs that cannot be merged, or merge options that do not fit them."""


@dataclass
class MergeInput:
    """One checkpoint's metadata: its common args and its model tensors and objects (no data)."""

    ckpt: str  # as given
    path: str  # the iter_* directory
    args: dict
    tensors: dict[str, ShardedTensor]  # by current key (``.key``: the key stored under)
    objects: dict[str, ShardedObject]  # by unique key (e.g. TE's _extra_state per layer)

    @property
    def model(self) -> dict:
        return self.args.get("model") or {}

    @property
    def root(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))


def open_input(ckpt: str) -> MergeInput:
    """The metadata of checkpoint ``ckpt`` (a save root or an ``iter_*`` directory)."""
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint
    from megatron_longctx.training.checkpoint_schema import current_key

    path = resolve_checkpoint(ckpt)
    if path is None:
        raise MergeError(f"{ckpt} holds no checkpoint")
    common = load_common(path)
    args = common.get("args")
    if not isinstance(args, dict) or "model" not in args:
        raise MergeError(f"{ckpt}: no 'args.model' in its metadata (not written by "
                         f"megatron_longctx); convert it first")
    tensors, objects = {}, {}
    for key, item in load_sharded_metadata(path).items():
        if key.startswith(NON_MODEL_PREFIXES):
            continue
        if isinstance(item, ShardedTensor):
            # by today's key (an older schema stores some under others; ``item.key``: where)
            tensors[current_key(key, common["schema_version"])] = item
        elif isinstance(item, ShardedObject):
            objects[key] = item
    return MergeInput(ckpt, path, args, tensors, objects)


def merge_weights(weights: Sequence[float] | None, count: int, normalize: bool) -> list[float]:
    """The weights, checked: one per input, non-negative, summing to 1 (``normalize``: scaled
    to); none given: the uniform average."""
    if not weights:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MergeError(f"--weights has {len(weights)} values for {count} checkpoints; give "
                         f"one weight per --load entry")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise MergeError(f"--weights must be finite and >= 0, got {list(weights)}")
    total = math.fsum(weights)
    if normalize:
        if total <= 0:
            raise MergeError("--weights sum to 0; nothing to normalize")
        return [w / total for w in weights]
    if abs(total - 1.0) > 1e-6:
        raise MergeError(f"--weights sum to {total:g}, not 1; fix them or pass --normalize "
                         f"to divide them by their sum")
    return list(weights)


def check_compatible(inputs: Sequence[MergeInput], allow_rope_mismatch: bool = False) -> None:
    """Raise ``MergeError`` unless every input is the same model as the first: model shape,
    vocabulary, tensors (shapes up to the vocabulary padding) and, unless allowed, RoPE."""
    first = inputs[0]
    for other in inputs[1:]:
        for fields, what in ((SHAPE_FIELDS, "model shape"), (ROPE_FIELDS, "RoPE")):
            if what == "RoPE" and allow_rope_mismatch:
                continue
            differ = [f"{name}: {first.model.get(name)!r} vs {other.model.get(name)!r}"
                      for name in fields if first.model.get(name) != other.model.get(name)]
            if differ:
                hint = (" (pass --allow-rope-mismatch to merge anyway; the result keeps the "
                        "first checkpoint's RoPE)" if what == "RoPE" else "")
                raise MergeError(f"{other.ckpt} has another {what} than {first.ckpt}: "
                                 f"{'; '.join(differ)}{hint}")
        missing = sorted(set(first.tensors) ^ set(other.tensors))
        if missing:
            raise MergeError(f"{first.ckpt} and {other.ckpt} hold different tensors "
                             f"({', '.join(missing[:4])}); merge checkpoints of one model")
        vocab = first.model["vocab_size"]
        for key, item in first.tensors.items():
            have, want = tuple(other.tensors[key].global_shape), tuple(item.global_shape)
            if key in VOCAB_KEYS:  # padding may differ with the layout that saved them
                have, want = (min(have[0], vocab),) + have[1:], (min(want[0], vocab),) + want[1:]
            if have != want:
                raise MergeError(f"{key}: {other.ckpt} {have}, {first.ckpt} {want}")
    for item in inputs:
        for key in VOCAB_KEYS:
            if key in item.tensors and item.tensors[key].global_shape[0] < item.model["vocab_size"]:
                raise MergeError(f"{item.ckpt}: {key} has {item.tensors[key].global_shape[0]} "
                                 f"rows, fewer than its vocab_size {item.model['vocab_size']}")


def _stacked(key: str, item: ShardedTensor, num_layers: int) -> bool:
    # megatron-core's TransformerBlock prepends the (global) layer index to every layer tensor
    return key.startswith("decoder.layers.") and len(item.global_shape) > 1 and \
        item.global_shape[0] == num_layers


@dataclass(frozen=True)
class _Piece:
    """What is merged at a time: one tensor, or one layer of a stacked tensor (``layer``); its
    first ``rows`` rows (the real vocabulary rows of the embedding and output layer)."""

    key: str
    layer: int | None
    rows: int

    @property
    def row_axis(self) -> int:
        return 0 if self.layer is None else 1


def _pieces(first: MergeInput) -> list[_Piece]:
    """Each layer of each stacked tensor, then each other tensor."""
    num_layers = first.model["num_layers"]
    pieces = []
    for layer in range(num_layers):
        pieces += [_Piece(key, layer, item.global_shape[1]) for key, item in first.tensors.items()
                   if _stacked(key, item, num_layers)]
    for key, item in first.tensors.items():
        if not _stacked(key, item, num_layers):
            rows = first.model["vocab_size"] if key in VOCAB_KEYS else item.global_shape[0]
            pieces.append(_Piece(key, None, rows))
    return pieces


def _read(item: MergeInput, piece: _Piece, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a piece of one checkpoint (only that region is read)."""
    meta = item.tensors[piece.key]
    shape = list(meta.global_shape)
    offset = [0] * len(shape)
    if piece.layer is not None:
        shape[0], offset[0] = 1, piece.layer
    shape[piece.row_axis], offset[piece.row_axis] = stop - start, start
    # no regular grid: megatron-core then reads any region (CheckpointableShardedTensor)
    request = ShardedTensor(meta.key, torch.empty(shape, dtype=meta.dtype), meta.dtype,
                            tuple(shape), tuple(meta.global_shape), tuple(offset),
                            axis_fragmentations=None)
    return dist_checkpointing.load({"piece": request}, item.path,
                                   validate_access_integrity=False)["piece"]


def _accumulator_dtype(dtypes) -> torch.dtype:
    # float64 keeps an fp32 average exact to the last bit (0.5·a + 0.5·a == a); 16-bit inputs
    # lose nothing in float32
    return torch.float64 if any(d in (torch.float32, torch.float64) for d in dtypes) \
        else torch.float32


def _merge_piece(inputs: Sequence[MergeInput], weights: Sequence[float], piece: _Piece,
                 out: torch.Tensor, chunk_bytes: int) -> None:
    """``out`` (the piece, file-backed) = ``Σ w_i · piece_i``, read ``chunk_bytes`` of rows at a
    time; rows past ``piece.rows`` (vocabulary padding) are zero."""
    dtypes = [item.tensors[piece.key].dtype for item in inputs]
    rows = out.narrow(piece.row_axis, 0, piece.rows)
    row_bytes = math.prod(out.shape[piece.row_axis + 1:]) * out.element_size()
    step = max(chunk_bytes // row_bytes, 1)
    for start in range(0, piece.rows, step):
        stop = min(start + step, piece.rows)
        total = None
        for item, weight in zip(inputs, weights):
            tensor = _read(item, piece, start, stop)
            if total is None:
                total = torch.zeros(tensor.shape, dtype=_accumulator_dtype(dtypes))
            total.add_(tensor, alpha=weight)  # promoted element-wise, no converted copy
            del tensor
        rows.narrow(piece.row_axis, start, stop - start).copy_(total)
        del total
    out.narrow(piece.row_axis, piece.rows, out.shape[piece.row_axis] - piece.rows).zero_()


class _MergedModel:
    """The merged tensors as ``save_weights`` sees a model: a sharded state dict of the global
    tensors (layer pieces stacked as megatron-core stacks them) and the carried objects."""

    def __init__(self):
        self.items: list = []

    def add_tensor(self, key: str, data: torch.Tensor, layer: int | None,
                   global_shape: tuple) -> None:
        """``data``: the whole tensor, or layer ``layer`` of it (shaped ``[1, ...]``)."""
        offset = (layer or 0,) + (0,) * (data.dim() - 1)
        grid = tuple(g // s for g, s in zip(global_shape, data.shape))  # layers x 1 x ... x 1
        self.items.append(ShardedTensor(key, data, data.dtype, tuple(data.shape), global_shape,
                                        offset, axis_fragmentations=grid))

    def sharded_state_dict(self) -> dict:
        return {str(i): item for i, item in enumerate(self.items)}


class _SavedArgs:
    """``save_weights`` writes ``cfg.to_dict()`` as the checkpoint's ``args``."""

    def __init__(self, args: dict):
        self.args = args

    def to_dict(self) -> dict:
        return self.args


def _output_args(first: MergeInput, tp: int, pp: int, save: str) -> dict:
    args = copy.deepcopy(first.args)
    parallel = args.setdefault("parallel", {})
    parallel["tensor_model_parallel_size"], parallel["pipeline_model_parallel_size"] = tp, pp
    data = args.get("data") or {}
    tokenizer_dir = os.path.join(first.root, "tokenizer")
    if data.get("tokenizer_model") and os.path.isdir(tokenizer_dir) and \
            os.path.abspath(data["tokenizer_model"]) == tokenizer_dir:
        data["tokenizer_model"] = os.path.join(os.path.abspath(save), "tokenizer")
    return args


def _check_layout(first: MergeInput, tp: int, pp: int) -> None:
    from megatron_longctx.config import ParallelConfig
    from megatron_longctx.model.loading import model_config_from_args

    layout = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        layout.validate(tp * pp, model_config_from_args(first.args))
    except ValueError as err:
        raise MergeError(str(err)) from None


def _carry_files(first: MergeInput, save: str) -> None:
    """What a conversion keeps beside the checkpoint (tokenizer files, the HF config that
    export reads), from the first input."""
    from megatron_longctx.convert.hf_to_mcore import SOURCE_CONFIG, TOKENIZER_DIR

    if os.path.isdir(os.path.join(first.root, TOKENIZER_DIR)):
        shutil.copytree(os.path.join(first.root, TOKENIZER_DIR),
                        os.path.join(save, TOKENIZER_DIR), dirs_exist_ok=True)
    if os.path.isfile(os.path.join(first.root, SOURCE_CONFIG)):
        shutil.copy2(os.path.join(first.root, SOURCE_CONFIG), os.path.join(save, SOURCE_CONFIG))


def merge_checkpoints(checkpoints: Sequence[str], save: str,
                      weights: Sequence[float] | None = None, *, normalize: bool = False,
                      tp: int = 1, pp: int = 1, allow_rope_mismatch: bool = False,
                      chunk_bytes: int = 64 * 2**20, progress=None) -> str:
    """``Σ w_i · θ_i`` of ``checkpoints`` written to ``save`` (padded for TP=``tp``, recorded
    as TP=``tp``/PP=``pp``); returns the written ``iter_*`` directory. Everything is checked
    before any tensor is read; inputs are read ``chunk_bytes`` at a time. ``progress(done,
    total)`` is called after each piece."""
    from megatron_longctx.config import ParallelConfig
    from megatron_longctx.convert.scratch import ScratchFiles
    from megatron_longctx.model.gpt import padded_vocab_size
    from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
    from megatron_longctx.training.checkpoint import TRACKER, save_weights

    if not checkpoints:
        raise MergeError("give the checkpoints to merge (--load A B ...)")
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise MergeError("merging runs in one process (it reads global tensors, which load at "
                         "any layout); run it without torchrun")
    weights = merge_weights(weights, len(checkpoints), normalize)
    if os.path.exists(os.path.join(save, TRACKER)):
        raise MergeError(f"{save} already holds a checkpoint; choose an empty --save")
    init_process_group()  # dist_checkpointing needs a (one-rank) process group
    inputs = [open_input(c) for c in checkpoints]
    check_compatible(inputs, allow_rope_mismatch)
    first = inputs[0]
    _check_layout(first, tp, pp)
    initialize_model_parallel(ParallelConfig(), seed=0)
    vocab = first.model["vocab_size"]
    padded = padded_vocab_size(vocab, tp, first.model.get("make_vocab_size_divisible_by", 128))
    os.makedirs(save, exist_ok=True)
    scratch_dir = os.path.join(save, ".merge-scratch")
    merged = _MergedModel()
    try:
        scratch = ScratchFiles(scratch_dir)
        pieces = _pieces(first)
        for done, piece in enumerate(pieces, 1):
            meta = first.tensors[piece.key]
            global_shape = tuple(meta.global_shape)
            if piece.key in VOCAB_KEYS:
                global_shape = (padded,) + global_shape[1:]
            shape = (1,) + global_shape[1:] if piece.layer is not None else global_shape
            out = scratch.empty(torch.Size(shape), meta.dtype)
            _merge_piece(inputs, weights, piece, out, chunk_bytes)
            merged.add_tensor(piece.key, out, piece.layer, global_shape)
            if progress:
                progress(done, len(pieces))
        if first.objects:  # per-layer objects (Transformer Engine's extra state): the first's
            request = {k: ShardedObject(o.key, None, o.global_shape, o.global_offset)
                       for k, o in first.objects.items()}
            loaded = dist_checkpointing.load(request, first.path, validate_access_integrity=False)
            merged.items += [ShardedObject(o.key, loaded[k], o.global_shape, o.global_offset)
                             for k, o in request.items()]
        path = save_weights(merged, _SavedArgs(_output_args(first, tp, pp, save)), save, step=0)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    _carry_files(first, save)
    logger.info("merged %s with weights %s into %s", ", ".join(checkpoints),
                ", ".join(f"{w:g}" for w in weights), path)
    return path
