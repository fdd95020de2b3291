"""Command-line flags for :class:`~megatron_longctx.config.RunConfig`.

Flags are generated from the dataclass fields with Megatron-LM's spelling (``num_layers`` ->
``--num-layers``); RoPE settings use Megatron/HF names and fill ``model.rope_parameters``.
Precedence: dataclass defaults < ``--config recipe.yaml`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any

from megatron_longctx.config import RunConfig, chain_stages, load_stages
from megatron_longctx.megatron_flags import (
    add_megatron_flags,
    apply_megatron_flags,
    pop_megatron_flags,
)


def float_list(value: str) -> list[float]:
    """A list of floats: ``"1.0,1.2,1.5"`` or a file holding a JSON list or whitespace/comma
    separated numbers (LongRoPE factors are usually kept in files)."""
    if os.path.isfile(value):
        with open(value) as f:
            text = f.read().strip()
        if text.startswith("["):
            return [float(v) for v in json.loads(text)]
        value = text.replace("\n", " ").replace(",", " ")
        return [float(v) for v in value.split()]
    return [float(v) for v in value.replace(",", " ").split()]


# flag -> (rope_parameters key (HF names), type)
ROPE_FLAGS = {
    "rope_type": ("rope_type", str),
    "rotary_base": ("rope_theta", float),
    "rope_factor": ("factor", float),
    "original_max_position_embeddings": ("original_max_position_embeddings", int),
    "rope_beta_fast": ("beta_fast", float),
    "rope_beta_slow": ("beta_slow", float),
    "rope_attention_factor": ("attention_factor", float),
    "rope_low_freq_factor": ("low_freq_factor", float),
    "rope_high_freq_factor": ("high_freq_factor", float),
    "longrope_short_factor": ("short_factor", float_list),
    "longrope_long_factor": ("long_factor", float_list),
    "longrope_start_tokens": ("longrope_start_tokens", int),
    "harpe_scheme": ("harpe_scheme", str),
    "harpe_bases": ("harpe_bases", float_list),
    "harpe_base_min": ("harpe_base_min", float),
    "harpe_base_max": ("harpe_base_max", float),
    "harpe_stride": ("harpe_stride", float),
}


# Megatron-LM's own spellings, accepted beside the generated ones
FLAG_ALIASES = {
    "override_opt_param_scheduler": ["--override-opt_param-scheduler"],
    "use_checkpoint_opt_param_scheduler": ["--use-checkpoint-opt_param-scheduler"],
}
# fields that are not flags: the model's vocabulary comes from the tokenizer (--vocab-size is
# Megatron-LM's tokenizer setting, data.vocab_size)
NOT_FLAGS = {("model", "vocab_size")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags(name: str) -> list[str]:
    return [_flag(name), *FLAG_ALIASES.get(name, [])]


def _arg_type(tp: Any):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (sections model/parallel/training/data/"
                        "checkpoint/logging, optionally a list of stages)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, build the model, print sizes, and exit")
    parser.add_argument("--world-size", type=int,
                        help="with --dry-run: validate the layout for this many ranks without "
                             "launching them (default: the launched processes)")
    defaults = RunConfig()
    hints = {}
    for section in dataclasses.fields(RunConfig):
        group = parser.add_argument_group(section.name)
        section_obj = getattr(defaults, section.name)
        section_hints = typing.get_type_hints(type(section_obj))
        for f in dataclasses.fields(section_obj):
            tp = _arg_type(section_hints[f.name])
            if tp is dict or typing.get_origin(tp) is dict or (section.name, f.name) in NOT_FLAGS:
                continue  # structured (dedicated flags or YAML), or not set by a flag
            hints[f.name] = section.name
            default = getattr(section_obj, f.name)
            if tp is bool:
                group.add_argument(*_flags(f.name), dest=f.name,
                                   action=argparse.BooleanOptionalAction,
                                   help=f"(default: {default})")
            elif typing.get_origin(tp) is list:
                group.add_argument(*_flags(f.name), dest=f.name, nargs="+",
                                   type=typing.get_args(tp)[0], help=f"(default: {default})")
            else:
                group.add_argument(*_flags(f.name), dest=f.name, type=tp,
                                   help=f"(default: {default})")
    rope = parser.add_argument_group(
        "rope", "RoPE method and parameters (HF rope_parameters; see megatron_longctx/rope)")
    for flag, (key, tp) in ROPE_FLAGS.items():
        rope.add_argument(_flag(flag), dest=flag, type=tp, help=f"rope_parameters['{key}']")
    add_megatron_flags(parser)
    parser.set_defaults(_sections=hints)
    return parser


def _apply_flags(cfg: RunConfig, given: dict[str, Any], sections: dict[str, str]) -> RunConfig:
    for name, value in given.items():
        if name in ROPE_FLAGS:
            key, _ = ROPE_FLAGS[name]
            cfg.model.rope_parameters = {**cfg.model.rope_parameters, key: value}
        elif name in sections:
            setattr(getattr(cfg, sections[name]), name, value)
    return cfg


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    """One config per stage of the recipe (one without ``stages:``); command-line flags apply
    to every stage."""
    given = vars(args).copy()
    sections = given.pop("_sections")
    path = given.pop("config", None)
    world_size = given.pop("world_size", None)
    if world_size is not None and (world_size < 1 or not given.get("dry_run")):
        raise ValueError("--world-size N (N >= 1) is for --dry-run: a real run takes its size "
                         "from the launcher (torchrun or srun)")
    for name in ("dry_run", "megatron_notes"):
        given.pop(name, None)
    megatron = pop_megatron_flags(given)
    explicit = set(given) | {ROPE_FLAGS[k][0] for k in given if k in ROPE_FLAGS}
    stages = load_stages(path) if path else [RunConfig()]
    configs = []
    for cfg in stages:
        cfg = _apply_flags(cfg, given, sections)
        args.megatron_notes = apply_megatron_flags(cfg, megatron, explicit)
        configs.append(cfg)
    return chain_stages(configs)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    configs = configs_from_args(args)
    if len(configs) != 1:
        raise ValueError(f"the recipe has {len(configs)} stages; run it with tools/pretrain.py")
    return configs[0]


def parse_config(argv: list[str] | None = None, description: str = ""
                 ) -> tuple[RunConfig, argparse.Namespace]:
    configs, args = parse_stages(argv, description)
    if len(configs) != 1:
        raise ValueError(f"the recipe has {len(configs)} stages; run it with tools/pretrain.py")
    return configs[0], args


def parse_stages(argv: list[str] | None = None, description: str = ""
                 ) -> tuple[list[RunConfig], argparse.Namespace]:
    """The stage configs and the parsed flags; ``args.megatron_notes``: the startup lines for
    Megatron-LM flags without effect here."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    parsed = argparse.Namespace(**vars(args))
    configs = configs_from_args(parsed)
    args.megatron_notes = getattr(parsed, "megatron_notes", [])
    return configs, args
