"""Command-line flags for :class:`~megatron_longctx.config.RunConfig`.

Flags are generated from the dataclass fields with Megatron-LM's spelling (``num_layers`` ->
``--num-layers``); RoPE settings use Megatron/HF names and fill ``model.rope_parameters``.
Precedence: dataclass defaults < ``--config recipe.yaml`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from megatron_longctx.config import RunConfig

# flag -> rope_parameters key (HF names)
ROPE_FLAGS = {
    "rotary_base": ("rope_theta", float),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(tp: Any):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (sections model/parallel/training/data)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, build the model, print sizes, and exit")
    defaults = RunConfig()
    hints = {}
    for section in dataclasses.fields(RunConfig):
        group = parser.add_argument_group(section.name)
        section_obj = getattr(defaults, section.name)
        section_hints = typing.get_type_hints(type(section_obj))
        for f in dataclasses.fields(section_obj):
            tp = _arg_type(section_hints[f.name])
            if tp is dict or typing.get_origin(tp) is dict:
                continue  # structured: set through dedicated flags or YAML
            hints[f.name] = section.name
            default = getattr(section_obj, f.name)
            if tp is bool:
                group.add_argument(_flag(f.name), dest=f.name,
                                   action=argparse.BooleanOptionalAction,
                                   help=f"(default: {default})")
            else:
                group.add_argument(_flag(f.name), dest=f.name, type=tp,
                                   help=f"(default: {default})")
    rope = parser.add_argument_group("rope (HF rope_parameters)")
    for flag, (_, tp) in ROPE_FLAGS.items():
        rope.add_argument(_flag(flag), dest=flag, type=tp)
    parser.set_defaults(_sections=hints)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = vars(args).copy()
    sections = given.pop("_sections")
    path = given.pop("config", None)
    given.pop("dry_run", None)
    cfg = RunConfig.from_yaml(path) if path else RunConfig()
    for name, value in given.items():
        if name in ROPE_FLAGS:
            key, _ = ROPE_FLAGS[name]
            cfg.model.rope_parameters = {**cfg.model.rope_parameters, key: value}
        elif name in sections:
            setattr(getattr(cfg, sections[name]), name, value)
    return cfg


def parse_config(argv: list[str] | None = None, description: str = ""
                 ) -> tuple[RunConfig, argparse.Namespace]:
    parser = build_parser(description)
    args = parser.parse_args(argv)
    return config_from_args(argparse.Namespace(**vars(args))), args
