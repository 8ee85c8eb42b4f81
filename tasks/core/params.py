"""Read one section of params.yaml into a typed, frozen dataclass.

Each stage owns one section. Unknown keys, missing keys without a default and
values of the wrong type are refused with the key's full name and what was
expected — a typo in params.yaml must never silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A params.yaml section that does not match its dataclass."""


def load_section(cls: type[T], section: str, path: Path | str = PARAMS_FILE) -> T:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repo root)") from None
    if not isinstance(doc, dict) or section not in doc:
        raise ParamsError(f"{path}: no section '{section}'")
    return from_dict(cls, doc[section], prefix=section)


def from_dict(cls: type[T], raw: Any, prefix: str) -> T:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"{prefix}: unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
            f"expected some of: {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{key}: missing (expected {_describe(hints[name])})")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; lists become tuples (frozen)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm, key)
            except ParamsError:
                continue
        raise _wrong(key, value, tp)
    if tp is type(None):
        if value is None:
            return None
        raise _wrong(key, value, tp)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, value, tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(key, value, tp)
    if tp is int:
        # YAML's `true` is an int subclass in Python; it is never a count.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(key, value, tp)
    raise TypeError(f"{key}: annotation {tp!r} is not supported by the params loader")


def _wrong(key: str, value: Any, tp: Any) -> ParamsError:
    return ParamsError(f"{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return "a list [" + ", ".join(_describe(a) for a in args) + "]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def as_dict(obj: Any) -> dict:
    """The dataclass as plain JSON-able data (tuples → lists), for hashing keys."""
    return _plain(dataclasses.asdict(obj))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
