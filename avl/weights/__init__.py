"""Checkpoint reading: local directories and hub ids, sharded safetensors (or torch .bin),
per-family key maps, zero-copy loading into models built on the meta device."""

from avl.weights.errors import CheckpointError
from avl.weights.files import checkpoint_files, read_config, resolve_checkpoint
from avl.weights.keymap import KeyMap
from avl.weights.loader import load_checkpoint, read_checkpoint
from avl.weights.writer import save_sharded

__all__ = [
    "CheckpointError",
    "KeyMap",
    "checkpoint_files",
    "load_checkpoint",
    "read_checkpoint",
    "read_config",
    "resolve_checkpoint",
    "save_sharded",
]
