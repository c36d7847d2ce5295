"""`avl.load`: a checkpoint directory or hub id -> a ready model of the right family."""

from __future__ import annotations

import os

import torch
from torch import nn

from avl.families import get_family
from avl.inputs import check_device
from avl.weights import load_checkpoint, read_config, resolve_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load(
    path_or_hub_id: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> nn.Module:
    """Load a model from a local checkpoint directory or a hub id, in the hub's own layout.

    The family (`avl.families`) comes from `config.json`'s `model_type`. Weights are read from
    `model.safetensors` or the shards of `model.safetensors.index.json` with the hub's key names,
    memory-mapped, into a model built on the meta device (no second copy). `dtype=None` keeps the
    checkpoint's dtype; a name ("float16", ...) or a torch dtype casts. Hub ids resolve through
    `huggingface_hub.snapshot_download`, offline from the local cache when there is no network. A
    device this machine lacks (`cuda` on a CPU-only build) raises ValueError before anything is read.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    device = check_device(device)
    directory = resolve_checkpoint(path_or_hub_id, revision=revision)
    raw = read_config(directory)
    family = get_family(raw.get("model_type"), source=directory / "config.json")
    config = family.config_class.from_dict(raw)
    with torch.device("meta"):
        model = family.model_class(config)
    load_checkpoint(model, directory, family.key_map, dtype=dtype, device=device, tied=model.tied_weights)
    return model.eval()
