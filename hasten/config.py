"""Flat, typed configuration: dataclass defaults overridden by ``key=value`` strings.

An unknown key or a value that does not parse as the default's type is a :class:`HastenError` naming the key,
the expected type and the valid keys (nanoGPT-style configurator, but type-checked).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, TypeVar

from hasten.errors import HastenError

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(key: str, text: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() in ("none", "null", "") and len(options) < len(typing.get_args(kind)):
            return None
        errors = []
        for option in options:
            try:
                return _parse(key, text, option)
            except HastenError as e:
                errors.append(str(e))
        raise HastenError(errors[0])
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise HastenError(f"{key}={text!r}: expected true or false")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise HastenError(f"{key}={text!r}: expected {'an integer' if kind is int else 'a number'}") from None
        return value
    if kind is str:
        return text
    if origin in (tuple, list):
        (item,) = set(typing.get_args(kind)) - {Ellipsis}
        return tuple(_parse(key, part, item) for part in text.split(",") if part)
    raise HastenError(f"{key}: cannot parse values of type {kind}")


def apply_overrides(config: C, overrides: Iterable[str] | dict[str, Any]) -> C:
    """A copy of the dataclass ``config`` with ``key=value`` overrides applied (strings parsed by field type)."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    items = overrides.items() if isinstance(overrides, dict) else (_split(arg) for arg in overrides)
    changes = {}
    for key, value in items:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise HastenError(f"unknown key {key!r}{hint}")
        changes[key] = _parse(key, value, hints[key]) if isinstance(value, str) else value
    return dataclasses.replace(config, **changes)


def _split(arg: str) -> tuple[str, str]:
    key, sep, value = arg.partition("=")
    if not sep or not key:
        raise HastenError(f"expected key=value, got {arg!r}")
    return key.strip(), value.strip()
