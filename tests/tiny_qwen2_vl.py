"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints written by transformers itself (save_pretrained), and
prompts with `<|image_pad|>` runs for them. No downloads."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
IMAGE_ID, VIDEO_ID, VISION_START, VISION_END = 290, 291, 292, 293
PATCH_ROW = 3 * 2 * 14 * 14  # channels * temporal_patch_size * patch_size**2


def text_config(**overrides) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}) | overrides


def build_hf(directory: Path, family: str, seed: int = 0, tie: bool = False, **vision_overrides):
    """Write a tiny float64 checkpoint of `family` ("qwen2_vl" or "qwen2_5_vl") and return the
    transformers model. Weights are redrawn at std 0.2 (biases and norm gains included) so that a
    wrong rotary, window or position rule moves the outputs far beyond the tolerances."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=tie)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2) | vision_overrides
        config, cls = Qwen2VLConfig(text_config=text_config(), vision_config=vision, **ids), \
            Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1, 3]) | vision_overrides
        config, cls = Qwen2_5_VLConfig(text_config=text_config(), vision_config=vision, **ids), \
            Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2
            p.copy_(1.0 + noise if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight",
                                                    "layernorm.weight")) else noise)
    model.save_pretrained(directory)
    return model


def random_pixels(grid_thw: torch.Tensor, seed: int) -> torch.Tensor:
    rows = int(grid_thw.prod(-1).sum())
    return torch.randn(rows, PATCH_ROW, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def image_prompt(before: list[int], grids: list[list[int]], after: list[int], merge: int = 2) -> list[int]:
    """Text, then each image as <|vision_start|> + its <|image_pad|> run + <|vision_end|>, then text."""
    ids = list(before)
    for t, h, w in grids:
        ids += [VISION_START] + [IMAGE_ID] * (t * h * w // merge**2) + [VISION_END]
    return ids + list(after)


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
