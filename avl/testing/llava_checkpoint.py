"""A tiny random LLaVA-1.5 checkpoint in the hub's layout, built locally (no downloads).

Used by `avl demo` and by tests that need a complete checkpoint directory: `config.json`,
`model.safetensors`, tokenizer files and `preprocessor_config.json`. Its image path is real
(336 px, patch 14, 576 image tokens per image); the weights are random, so its answers are noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from avl.models.llava import Llava, LlavaConfig
from avl.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from avl.testing.llama_tokenizer import build_tiny_llama_tokenizer
from avl.weights import save_sharded

VOCAB_SIZE = 512


def tiny_llava_config(image_token_id: int, pad_token_id: int) -> dict:
    """A llava-hf style `config.json` dict with small widths and LLaVA-1.5's image geometry."""
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": image_token_id,
        "pad_token_id": pad_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 336, "patch_size": 14,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "text_config": {"model_type": "llama", "vocab_size": VOCAB_SIZE, "hidden_size": 128,
                        "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
                        "tie_word_embeddings": False},
    }


def build_tiny_llava(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random LLaVA-1.5 checkpoint directory and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = build_tiny_llama_tokenizer(out, vocab_size=VOCAB_SIZE)
    raw = tiny_llava_config(ids["image_token_id"], ids["pad_token_id"])
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 336, "width": 336},
        "size": {"shortest_edge": 336}, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    }, indent=1))
    generator = torch.Generator().manual_seed(seed)
    model = Llava(LlavaConfig.from_dict(raw))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
            state[name] = tensor  # norms keep their identity init
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.1
    # the hub's (llava-hf, transformers >= 4.52) key names
    renamed = {_hub_name(k): v for k, v in state.items()}
    save_sharded(renamed, out, max_shard_bytes="50MB")
    return out


def _hub_name(name: str) -> str:
    if name.startswith("language_model.lm_head."):
        return name.replace("language_model.", "", 1)
    if name.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + name[len("vision_tower."):]
    return "model." + name
