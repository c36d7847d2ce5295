"""Reading the small JSON files of a checkpoint's processing side, with errors that name the file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object; ValueError naming the file if it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def read_optional_json(path: Path) -> dict[str, Any]:
    """`read_json_object`, or {} when the file does not exist."""
    return read_json_object(path) if path.is_file() else {}


def read_preprocessor_config(path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A `preprocessor_config.json` given as a dict, a file, or the checkpoint directory holding it."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / PREPROCESSOR_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"preprocessor config not found: {str(path)!r}")
    return read_json_object(path)
