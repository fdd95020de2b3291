"""``load_model``: a checkpoint of ours as a ready-to-run causal LM (eval, LongRoPE search,
conversion).

The model config comes from the checkpoint itself (``args.model`` in its common state, or the
``args`` of a Megatron-LM checkpoint; ``training/checkpoint_schema.py``). In a
plain process the model is built single-process (a one-rank gloo group is started if none
exists); inside an initialized distributed run it is built at the current (or the given)
TP/PP/CP layout: megatron-core dist checkpoints reshard on load, so any layout reads any
checkpoint.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig
from megatron_longctx.model.causal_lm import CausalLM
from megatron_longctx.model.gpt import build_model


def model_config_from_args(args: dict) -> ModelConfig:
    """Our model config from a checkpoint's ``args`` (``RunConfig.to_dict()``)."""
    if not isinstance(args, dict) or "model" not in args:
        raise ValueError("the checkpoint has no 'args.model' (not written by megatron_longctx)")
    return RunConfig.from_dict({"model": args["model"]}).model


@contextmanager
def _rng_untouched():
    """Building a model seeds and draws random numbers; the caller's RNG streams stay."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def _current_layout() -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size())


def _layout(parallel: ParallelConfig | None, model_cfg: ModelConfig) -> ParallelConfig:
    """Start the process group / model-parallel groups when needed; the layout to build."""
    from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel

    if not dist.is_initialized():
        init_process_group()
    if parallel is None and parallel_state.model_parallel_is_initialized():
        return _current_layout()
    parallel = parallel or ParallelConfig()
    if parallel_state.model_parallel_is_initialized() and _current_layout() == parallel:
        return parallel
    parallel.validate(dist.get_world_size(), model_cfg)
    initialize_model_parallel(parallel, seed=0)
    return parallel


def load_model(ckpt_dir: str, parallel: ParallelConfig | None = None,
               step: int | None = None) -> CausalLM:
    """The model of checkpoint ``ckpt_dir`` (a save root: its latest, or iteration ``step``;
    or an ``iter_*`` directory), weights loaded, in eval mode."""
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint
    from megatron_longctx.training.checkpoint_files import check_finite, read_errors
    from megatron_longctx.training.checkpoint_schema import (
        drop_absent_extra_state,
        load_model_state,
        stored_keys,
    )
    from megatron_longctx.training.pretrained import check_checkpoint_shapes

    path = resolve_checkpoint(ckpt_dir, step)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
    common = load_common(path)
    model_cfg = model_config_from_args(common.get("args"))
    with _rng_untouched():
        gpt = build_model(model_cfg, _layout(parallel, model_cfg))
    version = common["schema_version"]  # older checkpoints store some tensors under other keys
    check_checkpoint_shapes(gpt, path, version)
    with read_errors(path):
        request = drop_absent_extra_state(stored_keys(gpt.sharded_state_dict(), version), path)
        state = dist_checkpointing.load({"model": request}, path)
    load_model_state(gpt, state["model"])
    check_finite(gpt, path)
    return CausalLM(gpt, model_cfg).eval()
