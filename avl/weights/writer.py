"""Write a state dict in the hub's safetensors layouts (for tests, demos and tiny checkpoints)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from avl.weights.files import CONFIG_NAME, SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"200MiB"``, ``"100kB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"shard size {size!r} is not a number of bytes like 5GB or 200MiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise TypeError(f"shard size must be int or str, got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


def save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    max_shard_bytes: int | str,
    *,
    config: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``state_dict`` as the hub does; return the weight files written.

    If all tensors fit in ``max_shard_bytes``: one ``model.safetensors``. Otherwise shards
    ``model-0000i-of-0000n.safetensors``, filled greedily in the dict's order (a tensor larger
    than the limit gets a shard of its own), plus ``model.safetensors.index.json`` with
    ``metadata.total_size`` and ``weight_map``. ``config``, if given, is written as
    ``config.json``. Tensors sharing storage (tied weights) are written as separate copies.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _unshare({k: v.detach() for k, v in state_dict.items()})

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    metadata = {"format": "pt"}
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    paths = [out / n for n in names]
    for path, shard in zip(paths, shards, strict=True):
        save_file(shard, str(path), metadata=metadata)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: n for n, shard in zip(names, shards, strict=True) for k in shard},
        }
        (out / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if config is not None:
        (out / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2) + "\n")
    return paths


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage with an earlier one (safetensors refuses that)."""
    seen: set[tuple[torch.device, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.contiguous()
        ptr = (t.device, t.untyped_storage().data_ptr())
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # shared, or a view into a larger storage
        seen.add((t.device, t.untyped_storage().data_ptr()))
        out[name] = t
    return out
