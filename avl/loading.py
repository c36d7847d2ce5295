"""`avl.load`: a checkpoint directory or hub id -> a ready model of the right family."""

from __future__ import annotations

import os

import torch
from torch import nn

from avl.inputs import check_device
from avl.models.llava import Llava, LlavaConfig
from avl.models.llava_next import LlavaNext, LlavaNextConfig
from avl.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig
from avl.models.mllama import Mllama, MllamaConfig
from avl.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
from avl.models.qwen_vl import QwenVL, QwenVLConfig
from avl.weights import KeyMap, load_checkpoint, read_config, resolve_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# config.json `model_type` -> (config class, model class)
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "llava": (LlavaConfig, Llava),
    "llava_next": (LlavaNextConfig, LlavaNext),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevision),
    "mllama": (MllamaConfig, Mllama),
    "qwen": (QwenVLConfig, QwenVL),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VL),
    "qwen2_5_vl": (Qwen2VLConfig, Qwen2VL),
}


def load(
    path_or_hub_id: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> nn.Module:
    """Load a model from a local checkpoint directory or a hub id, in the hub's own layout.

    The family comes from `config.json`'s `model_type`. Weights are read from
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
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{directory / 'config.json'} has model_type={model_type!r}, which avl does not support; "
            f"supported: {sorted(FAMILIES)}"
        )
    config_cls, model_cls = FAMILIES[model_type]
    config = config_cls.from_dict(raw)
    with torch.device("meta"):
        model = model_cls(config)
    # a family's key_map is its rename rules, or a whole KeyMap when it also drops tensors
    key_map = model_cls.key_map if isinstance(model_cls.key_map, KeyMap) else KeyMap(model_cls.key_map)
    load_checkpoint(model, directory, key_map, dtype=dtype, device=device, tied=model.tied_weights)
    return model.eval()
