"""`load_chat_processor`: the right processor and single-turn chat prompt for a checkpoint's family."""

from __future__ import annotations

import os
from pathlib import Path

from avl.families import get_family
from avl.processing.chat import ChatProcessor
from avl.weights import read_config

__all__ = ["ChatProcessor", "load_chat_processor"]


def load_chat_processor(directory: str | os.PathLike[str]) -> ChatProcessor:
    """The chat processor of the checkpoint in `directory`, by its `config.json` `model_type`
    (`avl.families`); raises ValueError naming an unsupported model_type and the supported ones."""
    root = Path(directory)
    config = read_config(root)
    return get_family(config.get("model_type"), source=root / "config.json").chat_processor(root, config)
