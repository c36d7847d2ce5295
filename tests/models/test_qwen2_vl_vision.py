"""Qwen2-VL and Qwen2.5-VL vision towers against transformers' own `get_image_features` on tiny random
checkpoints that transformers wrote (float64, same weights file loaded with `avl.load`).

Tolerances. transformers keeps float32 islands in a float64 model (the vision rotary `q.float()`,
RMSNorm statistics). With `set_reference_casts()` we do the same and agree to ~1e-13 (1e-10
asserted); our plain float64 path differs from transformers by the islands' size, a few 1e-6 on
features of magnitude ~10 (5e-5 asserted). A wrong rotary axis, window or merge order moves
features by O(1)."""

from __future__ import annotations

import json

import pytest
import torch

import avl
from avl.models.qwen2_vl_vision import Qwen25VLVisionConfig, Qwen2VLVisionConfig, window_order
from tiny_qwen2_vl import build_hf, random_pixels

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# (t, h, w) patch grids per batch: square, wide, tall, tiny (one merge block), two images of
# different sizes, a two-frame grid; with window_size 56 (2 x 2 merged tokens) the odd sizes leave
# partial edge windows.
GRIDS = {
    "square": [[1, 8, 8]],
    "wide": [[1, 4, 18]],
    "tall": [[1, 14, 6]],
    "tiny": [[1, 2, 2]],
    "two_images": [[1, 6, 10], [1, 8, 4]],
    "two_frames": [[2, 6, 4]],
}


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = build_hf(directory, request.param)
    return request.param, hf, avl.load(directory)


def hf_features(hf, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return torch.cat(hf.get_image_features(pixels, grid).pooler_output)


@pytest.mark.parametrize("name", GRIDS)
@torch.inference_mode()
def test_image_features_match_transformers(checkpoint, name):
    family, hf, model = checkpoint
    grid = torch.tensor(GRIDS[name])
    pixels = random_pixels(grid, seed=len(name))
    ref = hf_features(hf, pixels, grid)
    try:
        exact = model.set_reference_casts().image_features(pixels, grid)
    finally:
        model.set_reference_casts(False)
    plain = model.image_features(pixels, grid)
    assert plain.dtype == torch.float64 and plain.shape == ref.shape
    assert (exact - ref).abs().max() <= 1e-10, (family, name)
    assert (plain - ref).abs().max() <= 5e-5, (family, name)
    assert ref.abs().max() > 1.0  # features of a size that a wrong rotary or window would visibly move


@torch.inference_mode()
def test_images_in_one_batch_do_not_attend_to_each_other(checkpoint):
    _, _, model = checkpoint
    grid = torch.tensor(GRIDS["two_images"])
    pixels = random_pixels(grid, seed=3)
    both = model.image_features(pixels, grid)
    rows = int(grid[0].prod())
    first = model.image_features(pixels[:rows], grid[:1])
    assert (both[: first.shape[0]] - first).abs().max() <= 1e-12


def test_window_order_tiles_each_frame_row_major():
    # a 3 x 5 merged grid with 2 x 2 windows: windows (0-1, 0-1), (0-1, 2-3), (0-1, 4), (2, 0-1), (2, 2-3), (2, 4)
    order, bounds = window_order([(1, 6, 10)], merge=2, window=2, device=torch.device("cpu"))
    assert order.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert (bounds.diff() // 4).tolist() == [4, 4, 2, 2, 2, 1]


@pytest.mark.parametrize("cls,raw,match", [
    (Qwen2VLVisionConfig, {"embed_dim": 30, "num_heads": 4}, "num_heads"),
    (Qwen2VLVisionConfig, {"hidden_act": "gelu"}, "hidden_act"),
    (Qwen25VLVisionConfig, {"window_size": 50}, "window_size"),
    (Qwen25VLVisionConfig, {"depth": 4, "fullatt_block_indexes": [4]}, "fullatt_block_indexes"),
])
def test_bad_vision_configs_are_named(cls, raw, match):
    with pytest.raises(ValueError, match=match):
        cls.from_dict(raw)


def test_bad_grids_and_pixels_are_named(checkpoint):
    _, _, model = checkpoint
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match="spatial_merge_size"):
        model.image_features(random_pixels(torch.tensor([[1, 3, 4]]), 0), torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match="patch rows"):
        model.image_features(random_pixels(grid, 0)[:-1], grid)
    with pytest.raises(ValueError, match="1176"):
        model.image_features(torch.zeros(16, 10, dtype=torch.float64), grid)


@torch.inference_mode()
def test_a_wrong_window_size_is_detected(tmp_path):
    """The parity test can fail: the same weights with another window size give other features."""
    hf = build_hf(tmp_path, "qwen2_5_vl", window_size=112)
    grid = torch.tensor(GRIDS["two_images"])
    pixels = random_pixels(grid, seed=5)
    ref = hf_features(hf, pixels, grid)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["vision_config"]["window_size"] = 56
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert (avl.load(tmp_path).image_features(pixels, grid) - ref).abs().max() > 1e-2
