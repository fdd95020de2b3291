"""Values from YAML (and other untyped sources) checked against a field's annotation."""

from __future__ import annotations

import typing
from typing import Any


def typed_value(where: str, value: Any, tp: Any) -> Any:
    """``value`` checked against a field's annotation. YAML reads ``3e-4`` as a string and
    ``"false"`` stays a string: both would be used silently otherwise."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is dict:  # rope_parameters: YAML 1.1 reads 1.0e6 (no sign) as a string
        ok = isinstance(value, dict)
        value = {k: yaml_number(v) for k, v in value.items()} if ok else value
    elif origin is list:
        ok = isinstance(value, list)
        value = [str(v) for v in value] if ok and typing.get_args(tp) == (str,) else value
    else:
        ok = isinstance(value, origin)
    if not ok:
        name = getattr(tp, "__name__", str(tp))
        raise ValueError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")
    return value


def yaml_number(value: Any) -> Any:
    if isinstance(value, list):
        return [yaml_number(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
