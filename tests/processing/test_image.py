"""ClipImageProcessor / load_image against transformers' PIL image processors (the reference)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from avl.processing import ClipImageProcessor, load_image, to_rgb

SIZES = [(37, 91), (500, 333), (1, 7), (7, 1), (336, 336), (200, 1000), (335, 337), (3, 2)]
MODES = ["RGB", "RGBA", "L", "P", "LA"]
# 8-bit content only: 16- and 32-bit integer images ("I;16", "I") are scaled to 8 bit on purpose,
# where transformers clips them at 255 (see test_wide_integer_images_are_scaled_not_clipped)
EXOTIC_MODES = ["CMYK", "F", "1", "RGBa", "PA", "YCbCr"]

LLAVA_HF_PREPROCESSOR_CONFIG = {  # llava-hf/llava-1.5-7b-hf preprocessor_config.json
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def _hf_clip(**kwargs):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kwargs)


def _hf_llava(**kwargs):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(**kwargs)


def _hf_pixels(processor, image: Image.Image) -> torch.Tensor:
    return torch.stack([torch.as_tensor(x) for x in processor(image)["pixel_values"]])


CLIP_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}


@pytest.fixture(scope="module")
def hf_clip():
    return _hf_clip(**CLIP_336)


@pytest.fixture(scope="module")
def hf_llava_pad():
    return _hf_llava(**CLIP_336, do_pad=True)


@pytest.mark.parametrize(
    "size,mode",
    [(size, mode) for size in SIZES for mode in MODES]
    + [(size, mode) for size in [(37, 91), (7, 1)] for mode in EXOTIC_MODES],
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else v,
)
def test_clip_matches_transformers(size, mode, hf_clip, make_image):
    image = make_image(*size, mode=mode)
    ours = ClipImageProcessor()(image)
    ref = _hf_pixels(hf_clip, image)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 336, 336)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_pad_to_square_matches_llava_do_pad(size, mode, hf_llava_pad, make_image):
    image = make_image(*size, mode=mode, seed=1)
    ours = ClipImageProcessor(pad_to_square=True)(image)
    ref = _hf_pixels(hf_llava_pad, image)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_pad_to_square_differs_from_plain_crop(make_image):
    """The padding must actually do something on non-square images (guards a no-op implementation)."""
    image = make_image(200, 100)
    padded = ClipImageProcessor(pad_to_square=True)(image)
    plain = ClipImageProcessor()(image)
    assert not torch.equal(padded, plain)
    # top rows are the mean colour int(m * 255) / 255, normalised
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    fill = torch.tensor([int(m * 255) for m in mean.tolist()], dtype=torch.float64) / 255
    expected = ((fill.float() - mean) / std).view(3, 1)
    torch.testing.assert_close(padded[0, :, 0, :], expected.expand(3, 336), rtol=0, atol=1e-6)


def test_palette_with_transparency_composited_on_white(hf_clip):
    image = Image.new("P", (40, 30))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.paste(1, (0, 0, 20, 30))
    image.info["transparency"] = 0
    ours = ClipImageProcessor()(image)
    assert torch.equal(ours, _hf_pixels(hf_clip, image))
    assert to_rgb(image).getpixel((39, 0)) == (255, 255, 255)


def test_batch_of_mixed_images(hf_clip, make_image):
    images = [make_image(50, 80), make_image(90, 40, "L"), make_image(64, 64, "RGBA")]
    ours = ClipImageProcessor()(images)
    ref = torch.stack([_hf_pixels(hf_clip, im)[0] for im in images])
    assert ours.shape == (3, 3, 336, 336)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    "hf_kwargs",
    [
        {"size": {"shortest_edge": 20}, "crop_size": {"height": 32, "width": 28}},  # crop larger: zero pad
        {"size": {"shortest_edge": 33}, "crop_size": {"height": 21, "width": 17}, "resample": 2},
        {"size": {"height": 24, "width": 40}, "crop_size": {"height": 24, "width": 40}, "resample": 1},
        {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}, "do_rescale": False},
        {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}, "do_normalize": False},
        {"size": {"shortest_edge": 30}, "do_center_crop": False, "resample": 0, "image_mean": [0.5] * 3},
    ],
)
@pytest.mark.parametrize("size", [(45, 19), (19, 45), (8, 8)], ids=str)
def test_other_settings_match_transformers(hf_kwargs, size, make_image):
    cfg = json.loads(json.dumps(hf_kwargs))
    ours = ClipImageProcessor.from_preprocessor_config(cfg)
    ref = _hf_clip(**hf_kwargs)
    image = make_image(*size, seed=3)
    assert torch.equal(ours(image), _hf_pixels(ref, image).float())


def test_from_preprocessor_config_llava_hf(tmp_path, make_image):
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA_HF_PREPROCESSOR_CONFIG))
    ours_from_dir = ClipImageProcessor.from_preprocessor_config(tmp_path)
    ours_from_file = ClipImageProcessor.from_preprocessor_config(tmp_path / "preprocessor_config.json")
    ours_from_dict = ClipImageProcessor.from_preprocessor_config(LLAVA_HF_PREPROCESSOR_CONFIG)
    assert ours_from_dir == ours_from_file == ours_from_dict
    assert ours_from_dict.crop_size == (336, 336) and ours_from_dict.size == 336
    assert ours_from_dict.resample == 3 and not ours_from_dict.pad_to_square
    ref = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    for image in (make_image(500, 333), make_image(91, 37, "RGBA")):
        assert torch.equal(ours_from_dir(image), _hf_pixels(ref, image))


def test_from_preprocessor_config_int_sizes_and_llava_pad(tmp_path, make_image):
    from transformers import AutoImageProcessor

    cfg = dict(LLAVA_HF_PREPROCESSOR_CONFIG, size=224, crop_size=224)
    cfg_pad = dict(cfg, image_processor_type="LlavaImageProcessor", do_pad=True)
    ours = ClipImageProcessor.from_preprocessor_config(cfg)
    ours_pad = ClipImageProcessor.from_preprocessor_config(cfg_pad)
    assert ours.size == 224 and ours.crop_size == (224, 224) and ours_pad.pad_to_square
    # CLIPImageProcessor's do_pad is batch padding, not pad-to-square
    assert not ClipImageProcessor.from_preprocessor_config(dict(cfg, do_pad=True)).pad_to_square
    image = make_image(300, 120)
    for c, o in ((cfg, ours), (cfg_pad, ours_pad)):
        d = tmp_path / c["image_processor_type"]
        d.mkdir()
        (d / "preprocessor_config.json").write_text(json.dumps(c))
        assert torch.equal(o(image), _hf_pixels(AutoImageProcessor.from_pretrained(d, backend="pil"), image))


def test_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ClipImageProcessor.from_preprocessor_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        ClipImageProcessor.from_preprocessor_config(tmp_path)
    with pytest.raises(ValueError, match="crop_size"):
        ClipImageProcessor(crop_size={"h": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resample"):
        ClipImageProcessor(resample=42)
    with pytest.raises(ValueError, match="image_mean"):
        ClipImageProcessor(image_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="longest_edge"):
        ClipImageProcessor.from_preprocessor_config({"size": {"shortest_edge": 336, "longest_edge": 672}})
    with pytest.raises(TypeError, match="PIL"):
        ClipImageProcessor()([torch.zeros(3, 4, 4)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="do_convert_rgb"):
        ClipImageProcessor(do_convert_rgb=False)(Image.new("L", (4, 4)))


# ---------------------------------------------------------------- load_image


@pytest.mark.parametrize("mode,ext", [("RGB", "png"), ("RGBA", "png"), ("LA", "png"), ("L", "jpg"),
                                      ("P", "png"), ("CMYK", "jpg"), ("RGB", "bmp")])
def test_load_image_matches_transformers(tmp_path, mode, ext, make_image):
    from transformers.image_utils import load_image as hf_load_image

    path = tmp_path / f"im_{mode.replace(';', '')}.{ext}"
    make_image(23, 17, mode).save(path)
    ours = load_image(path)
    ref = hf_load_image(str(path))
    assert ours.mode == "RGB" and ours.size == (23, 17)
    assert ours.tobytes() == ref.tobytes()
    assert load_image(str(path)).tobytes() == ours.tobytes()


def test_load_image_applies_exif_orientation(tmp_path, make_image):
    from transformers.image_utils import load_image as hf_load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rotated.jpg"
    make_image(30, 10).save(path, exif=exif.tobytes())
    ours = load_image(path)
    assert ours.size == (10, 30)
    assert ours.tobytes() == hf_load_image(str(path)).tobytes()


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nope" / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(missing)
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello, not a png")
    with pytest.raises(ValueError, match="not_an_image.png"):
        load_image(str(bad))
    with pytest.raises(TypeError, match="int"):
        load_image(3)  # type: ignore[arg-type]


def test_resize_rounding_is_truncation():
    """Shortest edge 336 of a 500x333 image: long edge int(336 * 500 / 333) = 504 (round() gives 505)."""
    p = ClipImageProcessor(do_center_crop=False, size=336)
    assert 336 * 500 / 333 == pytest.approx(504.5, abs=0.5) and math.floor(336 * 500 / 333) == 504
    out = p(Image.new("RGB", (500, 333)))
    assert out.shape == (1, 3, 336, 504)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image))


def _gray8(seed: int = 0) -> torch.Tensor:
    """A 17x23 uint8 grayscale pattern covering 0 and 255."""
    values = torch.randint(0, 256, (17, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    values[0, 0], values[0, 1] = 0, 255
    return values


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_files_are_scaled_to_8bit_not_clipped(tmp_path, suffix):
    from transformers.image_utils import load_image as hf_load_image

    gray = _gray8()
    wide = gray.to(torch.int32) * 257  # 8 bit widened to 16: x -> x * 257
    path = tmp_path / f"gray16.{suffix}"
    Image.fromarray(wide.numpy().astype("uint16")).save(path)
    assert Image.open(path).mode.startswith("I;16")
    ours = load_image(path)
    assert ours.mode == "RGB"
    assert torch.equal(_pixels(ours), gray[..., None].expand(-1, -1, 3))
    # the documented difference: transformers' PIL path clips at 255, so every pixel above 0 is white
    ref = _pixels(hf_load_image(str(path)))[..., 0]
    assert torch.equal(ref, torch.where(gray > 0, 255, 0).to(torch.uint8))


def test_wide_integer_images_are_scaled_not_clipped():
    gray = _gray8(1)
    as_l = Image.fromarray(gray.numpy(), mode="L")
    wide16 = Image.fromarray((gray.to(torch.int32) * 257).numpy().astype("uint16"))
    assert wide16.mode == "I;16"
    processor = ClipImageProcessor(size=32, crop_size=16)
    assert torch.equal(processor(wide16), processor(as_l))
    # mode I holding 16-bit values (as some decoders give 16-bit data): the 16-bit scale
    wide32 = Image.fromarray((gray.to(torch.int32) * 257).numpy())
    assert wide32.mode == "I"
    assert torch.equal(processor(wide32), processor(as_l))
    # mode I beyond 16 bits: the 32-bit scale, round(v * 255 / (2**31 - 1)); negatives are 0
    full32 = torch.tensor([[2**31 - 1, 2**30, -5, 70000]], dtype=torch.int32)
    scaled = to_rgb(Image.fromarray(full32.numpy()))
    assert _pixels(scaled)[0, :, 0].tolist() == [255, 128, 0, 0]


def test_eval_data_scales_16bit_images(tmp_path):
    import io

    from avl.eval.data import ImageRef

    gray = _gray8(2)
    buffer = io.BytesIO()
    Image.fromarray((gray.to(torch.int32) * 257).numpy().astype("uint16")).save(buffer, format="PNG")
    image = ImageRef(buffer.getvalue(), None).open()
    assert torch.equal(_pixels(image)[..., 1], gray)
