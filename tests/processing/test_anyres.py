"""Anyres geometry and preprocessing against transformers' LlavaNextImageProcessor (PIL backend),
its processor's token counts and the model's unpad rule."""

from __future__ import annotations

import random

import pytest
import torch

from avl.processing.anyres import (
    DEFAULT_GRID_PINPOINTS,
    LlavaNextImageProcessor,
    check_grid_pinpoints,
    num_image_tokens,
    num_tiles,
    resized_size,
    select_best_resolution,
    unpadded_window,
)

TINY_PINPOINTS = [[24, 48], [48, 24], [48, 48]]
PINPOINTS_336 = [list(p) for p in DEFAULT_GRID_PINPOINTS]
# (width, height, mode): square, wide, tall, tiny, huge-ratio, palette / alpha / grey modes
IMAGES = [(30, 30, "RGB"), (500, 333, "RGB"), (37, 91, "P"), (7, 50, "LA"), (1000, 200, "L"), (64, 48, "RGBA"),
          (333, 500, "CMYK"), (1, 1, "RGB")]


def hf_image_processor(tile: int, pinpoints):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=pinpoints)


def shaped(size: tuple[int, int]) -> torch.Tensor:
    """A [3, height, width] tensor without the memory (transformers reads only the shape)."""
    return torch.empty(1, 1, 1).expand(3, *size)


def sizes(n: int, top: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, top), rng.randint(1, top)) for _ in range(n)]


@pytest.mark.parametrize("tile,pinpoints", [(24, TINY_PINPOINTS), (336, PINPOINTS_336)], ids=["tiny", "llava-1.6"])
def test_pixel_values_and_image_sizes_equal_transformers(make_image, tile, pinpoints):
    images = [make_image(w, h, mode=mode, seed=i) for i, (w, h, mode) in enumerate(IMAGES[: 4 if tile == 336 else 8])]
    ref = hf_image_processor(tile, pinpoints)(images, return_tensors="pt")
    ours = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, size=tile, crop_size=tile)(images)
    assert ours["pixel_values"].dtype == torch.float32 and ours["image_sizes"].dtype == torch.int64
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert ours["image_sizes"].tolist() == ref["image_sizes"].tolist() == [[im.height, im.width] for im in images]


def test_tiles_are_base_then_grid_row_by_row_with_black_padding_and_zero_tiles(make_image):
    """A 30 x 50 (height x width) image: best resolution 48 x 48, resized to 29 x 48, pasted 9 rows down
    (10 black rows below), cut into a 2 x 2 grid after the base tile. A 20 x 40 image has 1 + 2 tiles
    and two zero tiles to pad it to five."""
    processor = LlavaNextImageProcessor(image_grid_pinpoints=TINY_PINPOINTS, size=24, crop_size=24, do_normalize=False)
    out = processor([make_image(50, 30, mode="RGB"), make_image(40, 20, mode="RGB")])
    pixels = out["pixel_values"]  # [2, 5, 3, 24, 24], values in [0, 1]
    assert pixels.shape == (2, 5, 3, 24, 24) and out["image_sizes"].tolist() == [[30, 50], [20, 40]]
    black_rows = lambda tile: (pixels[0, tile] == 0).all(dim=(0, 2))  # [24] per row of the tile
    assert black_rows(1).tolist() == black_rows(2).tolist() == [True] * 9 + [False] * 15
    assert black_rows(3).tolist() == black_rows(4).tolist() == [False] * 14 + [True] * 10
    assert not black_rows(0).any()  # the base tile is the squashed image, no padding
    assert (pixels[1, 3:] == 0).all() and not (pixels[1, :3] == 0).all(dim=(1, 2, 3)).any()


@pytest.mark.parametrize("pinpoints,top", [(TINY_PINPOINTS, 150), (PINPOINTS_336, 3000)], ids=["tiny", "llava-1.6"])
def test_geometry_equals_transformers(pinpoints, top):
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tile = 24 if pinpoints is TINY_PINPOINTS else 336
    fixed = [tuple(p) for p in pinpoints]
    for size in sizes(400, top, seed=top) + [(336, 672), (672, 336), (1, 5000), (5000, 1)]:
        best = select_best_resolution(size, fixed)
        assert best == hf_select(size, pinpoints), size
        assert resized_size(size, best) == get_patch_output_size(shaped(size), best, "channels_first")
        assert num_tiles(size, fixed, tile) == image_size_to_num_patches(size, pinpoints, tile)


@pytest.mark.parametrize("tile,patch,pinpoints,top", [(24, 6, TINY_PINPOINTS, 150), (336, 14, PINPOINTS_336, 3000)],
                         ids=["tiny", "llava-1.6"])
def test_token_counts_equal_the_transformers_processor(tiny_tok_dir, tile, patch, pinpoints, top):
    """`num_image_tokens` = transformers' `_get_number_of_features(h, w, tile, tile) - 1` (CLS dropped)."""
    from transformers import AutoTokenizer, LlavaNextProcessor

    reference = LlavaNextProcessor(image_processor=hf_image_processor(tile, pinpoints),
                                   tokenizer=AutoTokenizer.from_pretrained(tiny_tok_dir), patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    fixed = [tuple(p) for p in pinpoints]
    for h, w in sizes(500, top, seed=tile) + [(w, 3 * w) for w in range(1, 60)] + [(7 * k, 11 * k) for k in (1, 9, 77)]:
        expected = reference._get_number_of_features(h, w, tile, tile) - 1
        assert num_image_tokens((h, w), fixed, tile, patch) == expected, (h, w)


def test_unpadded_window_equals_the_models_unpad_image():
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    for grid in [(8, 8), (8, 4), (4, 8), (48, 48), (24, 72), (72, 24)]:
        features = torch.arange(grid[0] * grid[1]).view(1, *grid)
        for size in sizes(300, 2000, seed=sum(grid)) + [(3, 7), (7, 3), (1000, 1), (1, 1000)]:
            r0, r1, c0, c1 = unpadded_window(size, grid)
            assert torch.equal(features[:, r0:r1, c0:c1], unpad_image(features, size)), (size, grid)


def test_from_preprocessor_config_reads_the_hub_file(tmp_path):
    """llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json."""
    import json

    config = {"aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
              "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_grid_pinpoints": PINPOINTS_336, "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_processor_type": "LlavaNextImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
              "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
              "size": {"shortest_edge": 336}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = LlavaNextImageProcessor.from_preprocessor_config(tmp_path)
    assert processor.image_grid_pinpoints == DEFAULT_GRID_PINPOINTS
    assert (processor.tile, processor.base_size, processor.resample) == (336, (336, 336), 3)
    # 500 x 333 (height x width): best resolution 672 x 336, a 2 x 1 tile grid -> a 48 x 24 feature map; the
    # image is relatively wider, so rows are cut: int(round(500 * 24 / 333, 7)) = 36 rows of 24 + 1 newline
    assert select_best_resolution((500, 333), processor.image_grid_pinpoints) == (672, 336)
    assert processor.num_image_tokens((500, 333), patch_size=14) == 24 * 24 + 36 * (24 + 1)


def test_bad_pinpoints_and_images_are_named(make_image):
    with pytest.raises(ValueError, match=r"\[24, 40\] is not a multiple of the tile size 24"):
        check_grid_pinpoints([[24, 48], [24, 40]], 24)
    with pytest.raises(ValueError, match=r"entry \[24, 0\] must be a \[height, width\] pair of positive ints"):
        LlavaNextImageProcessor(image_grid_pinpoints=[[24, 0]], size=24, crop_size=24)
    processor = LlavaNextImageProcessor(image_grid_pinpoints=TINY_PINPOINTS, size=24, crop_size=24)
    with pytest.raises(ValueError, match="no images given"):
        processor([])
    with pytest.raises(TypeError, match="expected a PIL.Image.Image, got Tensor"):
        processor([torch.zeros(3, 24, 24)])
    with pytest.raises(ValueError, match=r"\(height, width\), two positive ints; got \(0, 5\)"):
        processor.num_tiles((0, 5))
