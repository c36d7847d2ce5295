"""Helpers for the config dataclasses parsed from a checkpoint's `config.json`."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def config_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The entries of a hub config dict that `cls` declares; the hub's many other fields are ignored.

    Each value must have its field's JSON type (an int for `int`, a number for `float`, true/false
    for `bool`, a string for `str`, an object for `dict`, a list for `tuple`); otherwise
    `ValueError` names the field, its value and the type allowed (`"num_hidden_layers": "4"`
    would fail later as a TypeError far from config.json).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    out = {k: v for k, v in raw.items() if k in fields and v is not None}
    for name, value in out.items():
        allowed = [t for t in _alternatives(fields[name]) if t is not type(None)]
        if allowed and not any(_json_matches(value, t) for t in allowed):
            names = " or ".join(_JSON_NAMES.get(t, getattr(t, "__name__", str(t))) for t in allowed)
            raise ValueError(f"config field {name}={value!r} is a JSON {_json_name(value)} ({cls.__name__}); "
                             f"allowed: {names}")
    return out


_JSON_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
               tuple: "a list", list: "a list"}


def _alternatives(hint: Any) -> list[type]:
    """The plain types a field hint allows (`int | None` -> [int, NoneType], `tuple[int, ...]` -> [tuple]);
    hints of other kinds (nested config classes) are not checked here."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = [typing.get_origin(a) or a for a in args]
    return [t for t in plain if t in _JSON_NAMES or t is type(None)]


def _json_matches(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    if kind in (tuple, list):
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def _json_name(value: Any) -> str:
    for label, kinds in (("bool", bool), ("number", (int, float)), ("string", str), ("object", dict),
                         ("list", (list, tuple))):
        if isinstance(value, kinds):
            return label
    return type(value).__name__


def require(ok: bool, field: str, value: Any, allowed: Any) -> None:
    """Raise `ValueError` naming the field, its bad value and what is allowed, unless `ok`."""
    if not ok:
        raise ValueError(f"{field}={value!r} is not supported; allowed: {allowed}")
