"""YAML recipes: one run or a list of ``stages`` deep-merged over the top level, and how
stages chain (each saves to ``<save>/stage_<k>`` and starts from the previous one)."""

from __future__ import annotations

import os

import yaml

from megatron_longctx.config.run import RunConfig


def _deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``; nested sections merge, ``rope_parameters`` is replaced
    whole (a stage that switches RoPE method must not inherit the old method's keys)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and \
                key != "rope_parameters":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_stages(path: str) -> list[RunConfig]:
    """The configs of a YAML recipe: one, or one per entry of its ``stages:`` list (each
    deep-merged over the recipe's top level)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    stages = raw.pop("stages", None)
    if stages is None:
        return [RunConfig.from_dict(raw)]
    if not isinstance(stages, list) or not stages or \
            not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"{path}: 'stages' must be a non-empty list of mappings")
    configs = []
    for k, stage in enumerate(stages, start=1):
        try:
            configs.append(RunConfig.from_dict(_deep_merge(raw, stage)))
        except ValueError as err:
            raise ValueError(f"{path}, stage {k}: {err}") from None
    return configs


def chain_stages(configs: list[RunConfig]) -> list[RunConfig]:
    """Stage k saves to and resumes from ``<save>/stage_<k>`` (TensorBoard: ``<dir>/stage_<k>``)
    and stage k+1 starts from stage k's final weights (``--pretrained-checkpoint`` semantics:
    fresh optimizer, schedule and RNG); only stage 1 takes ``pretrained_checkpoint`` from the
    recipe."""
    if len(configs) < 2:
        return configs
    for k, cfg in enumerate(configs, start=1):
        ck = cfg.checkpoint
        for name in ("load", "ckpt_step", "finetune"):
            if getattr(ck, name):
                raise ValueError(
                    f"stage {k}: checkpoint.{name} (--{name.replace('_', '-')}) is set, but "
                    f"stages load their own checkpoints (<save>/stage_<k>); start stage 1 from "
                    f"other weights with checkpoint.pretrained_checkpoint")
        if not ck.save:
            raise ValueError("a recipe with stages needs checkpoint.save (or --save): each stage "
                             "saves to <save>/stage_<k> and the next starts from it")
        ck.save = ck.load = os.path.join(ck.save, f"stage_{k}")
        if cfg.logging.tensorboard_dir:
            cfg.logging.tensorboard_dir = os.path.join(cfg.logging.tensorboard_dir, f"stage_{k}")
        if cfg.logging.wandb_exp_name:
            cfg.logging.wandb_exp_name = f"{cfg.logging.wandb_exp_name}-stage_{k}"
        if k > 1:
            ck.pretrained_checkpoint = configs[k - 2].checkpoint.save
    return configs
