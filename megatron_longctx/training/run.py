"""Start a run from a config: validate, set up parallel groups, data, model; then train."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import torch.distributed as dist
import yaml
from tqdm import tqdm

from megatron_longctx.config import RunConfig
from megatron_longctx.data.long_context_dataset import SampleOptions, build_blended_dataset
from megatron_longctx.data.packing import split_documents
from megatron_longctx.data.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.data.tokenizers import build_tokenizer
from megatron_longctx.parallel.initialize import (
    distributed_env,
    init_process_group,
    initialize_model_parallel,
)
from megatron_longctx.training.checkpoint import load_checkpoint

logger = logging.getLogger("megatron_longctx")


def build_datasets(cfg: RunConfig):
    """Training and validation datasets (the latter None without ``--eval-interval``); sets
    ``cfg.model.vocab_size`` from the tokenizer."""
    d, t = cfg.data, cfg.training
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
    cfg.model.vocab_size = tokenizer.vocab_size
    options = SampleOptions(t.seq_length, eod=tokenizer.eod,
                            reset_position_ids=d.reset_position_ids,
                            eod_mask_loss=d.eod_mask_loss)
    evaluate = bool(t.eval_interval)
    if d.data_path == ["stdlib"]:
        tokens = stdlib_token_stream(tokenizer)
        (a, b), (c, e), _ = split_documents(len(tokens), d.split)  # token ranges here
        valid = TokenStreamDataset(tokens[c:e], t.seq_length, options) if evaluate else None
        return TokenStreamDataset(tokens[a:b], t.seq_length, options), valid
    train = build_blended_dataset(d.data_path, d.split, t.train_iters * t.global_batch_size,
                                  options, t.seed, d.length_upsample, d.data_cache_path)
    valid = None
    if evaluate:
        valid = build_blended_dataset(d.data_path, d.split, t.eval_iters * t.global_batch_size,
                                      options, t.seed, None, d.data_cache_path, split_index=1)
    return train, valid


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe(cfg: RunConfig, model, world_size: int) -> dict:
    """Parameter count and weight + fp32 grad + optimizer memory of this rank."""
    params_local = sum(p.numel() for p in model.parameters())
    bf16 = cfg.training.bf16
    optimizer_bytes = 12 if bf16 else 8  # Adam moments (+ fp32 main weights with bf16)
    if cfg.parallel.use_distributed_optimizer:
        optimizer_bytes /= cfg.parallel.data_parallel_size(world_size)
    bytes_per_param = (2 if bf16 else 4) + 4 + optimizer_bytes
    return {"parameters_this_rank": params_local,
            "model_and_optimizer_gib_this_rank": round(params_local * bytes_per_param / 2**30, 4)}


def main(cfg: RunConfig, dry_run: bool = False) -> list[float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # ours at INFO, theirs quieter
    env = distributed_env()
    try:
        cfg.validate(env.world_size)  # before any process group, data or model work
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    init_process_group(env)
    initialize_model_parallel(cfg.parallel, cfg.training.seed)
    dataset, valid_dataset = build_datasets(cfg)
    from megatron_longctx.training.trainer import Trainer

    trainer = Trainer(cfg, dataset, valid_dataset=valid_dataset)
    if cfg.training.load and load_checkpoint(trainer, cfg.training.load):
        logger.info("resuming at step %d of %d", trainer.step, cfg.training.train_iters)
    is_last = dist.get_rank() == dist.get_world_size() - 1
    if is_last:
        logger.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        logger.info("model: %s", json.dumps(describe(cfg, trainer.model, env.world_size)))
    if dry_run:
        return []
    if cfg.training.save and dist.get_rank() == 0:
        os.makedirs(cfg.training.save, exist_ok=True)
        with open(os.path.join(cfg.training.save, "run.yaml"), "w") as f:
            yaml.safe_dump({"config": cfg.to_dict(), "git_revision": _git_revision(),
                            "command": sys.argv}, f, sort_keys=False)

    def log(step: int, metrics: dict) -> None:
        if is_last:
            tqdm.write(
                f"{time.strftime('%H:%M:%S')} step {step} | loss {metrics['loss']:.4f} | "
                f"lr {metrics['lr']:.3e} | grad norm {metrics['grad_norm']:.3f} | "
                f"{metrics['tokens_per_s']:.0f} tokens/s"
                + (f" | validation loss {metrics['validation_loss']:.4f}"
                   if "validation_loss" in metrics else ""))

    return trainer.train(on_log=log)
