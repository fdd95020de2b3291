"""Hugging Face safetensors checkpoint -> megatron-core distributed checkpoint of ours.

Everything is checked first (architecture, RoPE, sliding window, every tensor's presence and
shape from the shard headers); only then is the model built at the requested layout, without
drawing weights, and filled tensor by tensor, one layer at a time. Memory: the source shards
are mapped, not read, and each converted weight is written to a scratch file under the output
directory and mapped back, so the weights live in the page cache (file-backed, reclaimable)
rather than in process memory; the peak of anonymous memory is about one layer's tensors
(benchmarks/convert_memory.py: ~0.15x the model, run through tools/convert_hf_to_mcore.py,
which also keeps glibc from hoarding freed blocks). The scratch files are deleted once the
checkpoint is written; meanwhile they take the converted model's size (fp32) plus its
``linear_fc1`` weights again in free disk space.
The result is a weights-only checkpoint (``iter_0000000``) that ``--pretrained-checkpoint``,
``--load`` and :func:`~megatron_longctx.model.load_model` accept; the source's tokenizer files
and ``generation_config.json`` go to ``<out>/tokenizer/`` and its ``config.json`` to
``<out>/hf_config.json`` (the export picks the same architecture from it).

TP/PP: the dist checkpoint holds global tensors and reshards on load (the vocabulary padding
rows, Megatron-LM's ``--make-vocab-size-divisible-by`` x TP, are trimmed or added on load), so a
single process converts for any layout; under ``torchrun`` with ``TP x PP`` processes it
converts at that layout.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_longctx.config import ParallelConfig, RunConfig
from megatron_longctx.convert.hf_config import ConversionError, model_config_from_hf
from megatron_longctx.convert.safetensors_io import SafetensorsReader
from megatron_longctx.convert.scratch import ScratchFiles
from megatron_longctx.model.hf_conversion import embeddings_from_hf, hf_shapes, layer_from_hf

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
SOURCE_CONFIG = "hf_config.json"
CARRIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                 "merges.txt", "*.tiktoken", "chat_template*", "generation_config.json")
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def _read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json")
    with open(path) as f:
        return json.load(f)


def _layout(tp: int, pp: int) -> ParallelConfig:
    """The layout to build at: the requested one under torchrun (world = TP x PP), else one
    process (the checkpoint reshards on load, vocabulary padding included)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == tp * pp:
        return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if world == 1:
        if tp * pp > 1:
            logger.info("converting in one process; the checkpoint reshards to TP=%d PP=%d on "
                        "load", tp, pp)
        return ParallelConfig()
    raise ConversionError(f"run the conversion in one process or under torchrun with TP x PP "
                          f"= {tp * pp} processes (world size now {world})")


def _carry_files(hf_dir: str, out_dir: str, hf: dict) -> None:
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    for name in sorted(os.listdir(hf_dir)):
        if os.path.isfile(os.path.join(hf_dir, name)) and \
                any(fnmatch.fnmatch(name, p) for p in CARRIED_FILES):
            os.makedirs(tok_dir, exist_ok=True)
            shutil.copy2(os.path.join(hf_dir, name), os.path.join(tok_dir, name))
    with open(os.path.join(out_dir, SOURCE_CONFIG), "w") as f:
        json.dump(hf, f, indent=2)


class _SavedFromScratch:
    """The model as ``save_weights`` sees it: its sharded state dict with the factories applied
    (as ``dist_checkpointing.save`` would) and every tensor that is a view into a larger
    storage (the SwiGLU gate and up halves of ``linear_fc1``) moved to its own scratch file:
    megatron-core's writer clones such views in memory, all of them at once."""

    def __init__(self, model, scratch: ScratchFiles):
        self.model, self.scratch = model, scratch

    def sharded_state_dict(self) -> dict:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        state = self.model.sharded_state_dict()
        apply_factories(state)
        for item in nested_values(state):
            if isinstance(item, ShardedTensor) and item.data is not None and \
                    item.data.untyped_storage().nbytes() != item.data.nbytes:
                item.data = self.scratch(item.data)
        return state


@torch.no_grad()
def _fill(model, reader: SafetensorsReader, model_cfg, padded_vocab: int,
          scratch: ScratchFiles) -> None:
    """Point each of this rank's parameters at its shard of the HF tensors (a scratch file's
    mapping), one layer at a time; the parameters' own (untouched) storage is released."""
    from megatron_longctx.model.sharding import local_parameters, shard

    params = local_parameters(model)
    layers = sorted({int(m.group(1)) for n in params
                     if (m := re.match(r"decoder\.layers\.(\d+)\.", n))})
    groups = [lambda: embeddings_from_hf(reader.get, model_cfg, padded_vocab)]
    groups += [lambda i=i: layer_from_hf(reader.get, i, model_cfg) for i in layers]
    filled = set()
    for group in groups:
        full = group()
        for name in full.keys() & params.keys():
            param = params[name]
            value = shard(model, name, full[name], param)
            if value.shape != param.shape:
                raise ValueError(f"{name}: converted shape {tuple(value.shape)}, model "
                                 f"{tuple(param.shape)}")
            param.data = scratch(value, param.dtype)
            filled.add(name)
        del full
    missing = sorted(set(params) - filled)
    if missing:
        raise KeyError(f"no HF tensor maps to {missing[:5]}")


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1,
                make_vocab_size_divisible_by: int = 128, seed: int = 1234) -> str:
    """Convert the HF checkpoint in ``hf_dir``; returns the written ``iter_*`` directory."""
    from megatron_longctx.model.gpt import build_model, padded_vocab_size
    from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
    from megatron_longctx.training.checkpoint import TRACKER, save_weights

    hf = _read_config(hf_dir)
    model_cfg, arch = model_config_from_hf(hf)
    reader = SafetensorsReader(hf_dir)
    reader.check(hf_shapes(model_cfg), ignore=_IGNORED_TENSORS +
                 (() if model_cfg.untie_embeddings_and_output_weights else ("lm_head.weight",)))
    if os.path.exists(os.path.join(out_dir, TRACKER)):
        raise ConversionError(f"{out_dir} already holds a checkpoint; choose an empty --save")
    if make_vocab_size_divisible_by < 1:
        raise ConversionError(f"--make-vocab-size-divisible-by must be >= 1, got "
                              f"{make_vocab_size_divisible_by}")
    model_cfg.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    parallel = _layout(tp, pp)
    cfg = RunConfig(model=model_cfg, parallel=parallel)
    parallel.validate(parallel.model_parallel_size, model_cfg)
    init_process_group()
    initialize_model_parallel(parallel, seed)
    model = build_model(model_cfg, parallel, initialize=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    scratch_dir = os.path.join(out_dir, f".hf_to_mcore-scratch-{rank}")
    try:
        scratch = ScratchFiles(scratch_dir)
        _fill(model, reader, model_cfg,
              padded_vocab_size(model_cfg.vocab_size, parallel.tensor_model_parallel_size,
                                make_vocab_size_divisible_by),
              scratch)
        if any(fnmatch.fnmatch(n, "tokenizer*") for n in os.listdir(hf_dir)):
            cfg.data.tokenizer_type = "HuggingFaceTokenizer"
            cfg.data.tokenizer_model = os.path.join(os.path.abspath(out_dir), TOKENIZER_DIR)
        path = save_weights(_SavedFromScratch(model, scratch), cfg, out_dir, step=0)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        _carry_files(hf_dir, out_dir, hf)
    logger.info("converted %s (%s, %d layers) to %s", hf_dir, arch, model_cfg.num_layers, path)
    return path
