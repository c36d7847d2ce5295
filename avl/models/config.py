"""Helpers for the config dataclasses parsed from a checkpoint's `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any


def config_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The entries of a hub config dict that `cls` declares; the hub's many other fields are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names and v is not None}


def require(ok: bool, field: str, value: Any, allowed: Any) -> None:
    """Raise `ValueError` naming the field, its bad value and what is allowed, unless `ok`."""
    if not ok:
        raise ValueError(f"{field}={value!r} is not supported; allowed: {allowed}")
