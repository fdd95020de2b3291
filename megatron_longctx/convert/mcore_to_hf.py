"""megatron-core distributed checkpoint of ours -> Hugging Face safetensors checkpoint.

The architecture (``auto``) is the source model's when the checkpoint came from a conversion
(``<root>/hf_config.json``), else Qwen2 for q/k/v biases and Llama otherwise. Every refusal
(partial rotary, interleaved rotary, LongRoPE n-hat > 0, q/k/v biases outside Qwen2) happens
before anything is written. Tensors are written one at a time into shards of at most
``max_shard_bytes``; the tokenizer files kept in ``<root>/tokenizer/`` are copied along.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import torch
import torch.distributed as dist

from megatron_longctx.convert.hf_config import (
    ConversionError,
    architecture_of,
    hf_config,
    resolve_architecture,
)
from megatron_longctx.convert.hf_to_mcore import SOURCE_CONFIG, TOKENIZER_DIR
from megatron_longctx.convert.safetensors_io import SafetensorsWriter
from megatron_longctx.model.hf_conversion import embeddings_to_hf, layer_to_hf

logger = logging.getLogger(__name__)


def _source_config(root: str) -> dict | None:
    path = os.path.join(root, SOURCE_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _source_dtype(source: dict | None) -> torch.dtype | None:
    name = (source or {}).get("dtype") or (source or {}).get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def mcore_to_hf(ckpt_dir: str, hf_dir: str, architecture: str = "auto",
                step: int | None = None, max_shard_bytes: int = 5 * 2**30,
                dtype: torch.dtype | None = None) -> list[str]:
    """Export checkpoint ``ckpt_dir`` (a save root or an ``iter_*`` directory) to ``hf_dir``;
    returns the written safetensors files. ``dtype``: default the source model's (from a
    conversion), else the checkpoint's."""
    from megatron_longctx.model.loading import load_model, model_config_from_args
    from megatron_longctx.model.sharding import full_tensors
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConversionError("export runs in one process (the checkpoint reshards to TP=PP=1)")
    path = resolve_checkpoint(ckpt_dir, step)
    if path is None:
        raise ConversionError(f"{ckpt_dir} holds no checkpoint")
    root = ckpt_dir if os.path.abspath(path) != os.path.abspath(ckpt_dir) else \
        os.path.dirname(os.path.abspath(path))
    model_cfg = model_config_from_args(load_common(path).get("args"))
    source = _source_config(root)
    try:
        source_arch = architecture_of(source) if source else None
    except ConversionError:
        source_arch = None
    arch = resolve_architecture(model_cfg, architecture, source_arch)
    config = hf_config(model_cfg, arch)  # refuses what transformers cannot represent
    if glob.glob(os.path.join(hf_dir, "*.safetensors")) or \
            os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"{hf_dir} already holds a model; choose an empty directory")

    model = load_model(path)
    params = full_tensors(model.gpt)
    dtype = dtype or _source_dtype(source) or next(iter(params.values())).dtype
    os.makedirs(hf_dir, exist_ok=True)
    writer = SafetensorsWriter(hf_dir, max_shard_bytes)
    for name, tensor in embeddings_to_hf(params.__getitem__, model_cfg).items():
        writer.add(name, tensor.to(dtype))
    for i in range(model_cfg.num_layers):
        for name, tensor in layer_to_hf(params.__getitem__, i, model_cfg).items():
            writer.add(name, tensor.to(dtype))
    files = writer.close()
    config.dtype = dtype
    config.to_json_file(os.path.join(hf_dir, "config.json"))
    tok_dir = os.path.join(root, TOKENIZER_DIR)
    if os.path.isdir(tok_dir):
        for name in os.listdir(tok_dir):
            shutil.copy2(os.path.join(tok_dir, name), os.path.join(hf_dir, name))
    logger.info("exported %s as %s to %s (%d shard(s))", path, config.architectures[0], hf_dir,
                len(files))
    return files
