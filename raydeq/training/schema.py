"""Typed settings sections: dataclass fields with a default and the values they allow, built
from a plain mapping with one-line errors that name the key and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import operator
import reprlib
import types
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any, Union, get_args, get_origin, get_type_hints

from raydeq.training.errors import Recurring

_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le)}


class ConfigError(Recurring, ValueError):
    """A configuration key is unknown, or its value has the wrong type or is out of range;
    `key` is the dotted key the message names first (None for an error about no one key)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def option(
    default: Any,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A config field with its default and the values it allows."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _is_int(value: Any) -> bool:
    """True for integers (YAML booleans excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


_ACCEPTS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", _is_int),
    float: ("a number", lambda v: _is_int(v) or isinstance(v, float)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a mapping", lambda v: isinstance(v, Mapping)),
    tuple[int, ...]: (
        "a list of positive integers",
        lambda v: isinstance(v, list | tuple) and _bad_item(v, tuple[int, ...]) is None,
    ),
    tuple[dict, ...]: (
        "a list of mappings",
        lambda v: isinstance(v, list | tuple) and _bad_item(v, tuple[dict, ...]) is None,
    ),
}
# What each item of a list setting must be.
_ITEMS = {
    tuple[int, ...]: ("a positive integer", lambda i: _is_int(i) and i > 0),
    tuple[dict, ...]: ("a mapping", lambda i: isinstance(i, Mapping)),
}


def _bad_item(value: Sequence[Any], kind: Any) -> int | None:
    """The index of the first item of `value` that a list setting of type `kind` refuses."""
    return next((i for i, item in enumerate(value) if not _ITEMS[kind][1](item)), None)


def _finite(key: str, value: int | float) -> float:
    """`value` as a finite float, or a ConfigError."""
    if isinstance(value, float) or abs(value) < 2**1000:
        value = float(value)
        if math.isfinite(value):
            return value
    raise ConfigError(f"{key}: expected a finite number, got {reprlib.repr(value)}", key=key)


def listed(choices: Sequence[str]) -> str:
    """Choices as a message names them: "off, bf16 or fp16"."""
    *rest, last = choices
    return f"{', '.join(rest)} or {last}" if rest else last


def _expected(kinds: Sequence[Any], choices: tuple[str, ...] | None) -> str:
    """What a value of one of the types `kinds` must be, listed as one list ("true, false or
    graph"), a string of a field with choices as those choices, not any string."""
    return listed([named for kind in kinds for named in _alternatives(kind, choices)])


def _alternatives(kind: Any, choices: tuple[str, ...] | None) -> list[str]:
    """The values or kinds of value that type `kind` takes, one phrase each."""
    if kind is bool:
        return ["true", "false"]
    if kind is str and choices:
        return list(choices)
    return [_ACCEPTS[kind][0]]


def _coerce(key: str, value: Any, kind: Any, choices: tuple[str, ...] | None = None) -> Any:
    """Check `value` against the annotated type `kind` (a string's `choices` named where it
    is of no type the field takes) and return it in that type."""
    if get_origin(kind) in (Union, types.UnionType):
        if value is None:
            return None
        kinds = [arg for arg in get_args(kind) if arg is not type(None)]
        if len(kinds) > 1:
            kind = next((k for k in kinds if _ACCEPTS[k][1](value)), None)
            if kind is None:
                expected = _expected(kinds, choices)
                raise ConfigError(f"{key}: expected {expected}, got {reprlib.repr(value)}", key=key)
        else:
            kind = kinds[0]
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not _ACCEPTS[kind][1](value):
        expected = _expected([kind], choices)
        shown = reprlib.repr(value)
        if kind in _ITEMS and isinstance(value, list | tuple):  # cut short past 6 items
            index = _bad_item(value, kind)
            shown += f": {key}[{index}] is {reprlib.repr(value[index])}, not {_ITEMS[kind][0]}"
        raise ConfigError(f"{key}: expected {expected}, got {shown}", key=key)
    if kind is float:
        return _finite(key, value)
    if kind == tuple[dict, ...]:
        return tuple(dict(row) for row in value)
    return kind(value) if kind is dict else tuple(value) if kind == tuple[int, ...] else value


def _check_range(key: str, value: Any, meta: Mapping[str, Any], kind: Any) -> None:
    """Raise a ConfigError when `value` is outside the allowed values of a field of type
    `kind`."""
    if value is None:
        return
    # A field of several types takes its choices as its string values (model.compile).
    if meta["choices"] is not None and isinstance(value, str) and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        others = [_ACCEPTS[k][0] for k in get_args(kind) if k not in (str, type(None))]
        also = f" (or {' or '.join(others)})" if others else ""
        raise ConfigError(
            f"{key}: {value!r} is not allowed; choose one of {allowed}{also}", key=key
        )
    for name, (sign, holds) in _BOUNDS.items():
        bound = meta[name]
        if bound is not None and not holds(value, bound):
            shown = bound if isinstance(bound, int) else f"{bound:g}"
            raise ConfigError(f"{key}: must be {sign} {shown}, got {reprlib.repr(value)}", key=key)


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build the dataclass `cls` from the mapping `raw`, checking every key and value."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of keys to values, got {reprlib.repr(raw)}", key=where
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(fields)
            shown = key if isinstance(key, str) and key.isprintable() else reprlib.repr(key)
            raise ConfigError(
                f"{prefix}{shown}: unknown key; allowed keys in {where}: {allowed}",
                key=f"{prefix}{shown}",
            )
    hints = get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = build_section(
                kind, raw[name] if raw[name] is not None else {}, f"{name}."
            )
            continue
        value = raw[name]
        if value is False and "off" in (spec.metadata["choices"] or ()):
            value = "off"  # YAML 1.1 reads an unquoted `off` as false
        values[name] = _coerce(prefix + name, value, kind, spec.metadata["choices"])
        _check_range(prefix + name, values[name], spec.metadata, kind)
    return cls(**values)
