"""Image loading and CLIP-style preprocessing (LLaVA-1.5).

The arithmetic follows transformers' PIL/NumPy image processors (`CLIPImageProcessorPil`,
`LlavaImageProcessorPil`), which is what the llava-hf checkpoints were evaluated with:

1. convert to RGB: 16- and 32-bit integer images (modes `I;16*`, `I`) are first scaled to 8 bit
   (`to_8bit`); transparency is composited onto a white background, other modes use
   `Image.convert("RGB")`;
2. optional pad-to-square (original LLaVA-1.5 `image_aspect_ratio="pad"`): a square canvas of
   the mean colour `int(m * 255)`, the image pasted centred with offset `(long - short) // 2`;
3. resize with PIL on uint8: shortest edge to `size`, the long edge `int(size * long / short)`;
4. centre crop, offsets `(in - out) // 2` (zero padding, split with the extra pixel at the
   start, when the image is smaller than the crop);
5. rescale in float64, then cast to float32, then `(x - mean) / std` in float32.

Steps 3-5 use the same operations in the same precision, so the result is bit-identical for 8-bit
images. It differs on purpose for 16- and 32-bit integer images: `Image.convert("RGB")`, which
transformers' PIL path (and the original LLaVA code) uses, clips each value at 255, so a 16-bit
PNG comes out near white; avl scales it to 8 bit first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from avl.processing.files import read_preprocessor_config

ImageLike = Union[Image.Image, str, os.PathLike]  # an image, or the path of an image file

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling codes as stored in the hub's preprocessor_config.json ("resample": 3).
_PIL_RESAMPLE_CODES = {int(r): r for r in Image.Resampling}


# integer modes wider than 8 bit -> the largest value of their range
_WIDE_INTEGER_MODES = {"I;16": 2**16 - 1, "I;16L": 2**16 - 1, "I;16B": 2**16 - 1, "I;16N": 2**16 - 1,
                       "I": 2**31 - 1}


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer image scaled to 8-bit grayscale ("L"); other images unchanged.

    `v -> round(v * 255 / full)`, with `full` = 65535 for the `I;16*` modes (16-bit PNG / TIFF), so
    an 8-bit image widened to 16 bits (`x * 257`) comes back exactly. Mode `I` (signed 32-bit)
    uses 65535 as well when every value fits in 16 bits (some Pillow versions and formats decode
    16-bit data as `I`), else 2**31 - 1; negative values become 0. `Image.convert` would clip at 255
    instead (a near-white image).
    """
    full = _WIDE_INTEGER_MODES.get(image.mode)
    if full is None:
        return image
    values = np.asarray(image).astype(np.float64).clip(min=0)
    if image.mode == "I" and values.size and values.max() <= _WIDE_INTEGER_MODES["I;16"]:
        full = _WIDE_INTEGER_MODES["I;16"]
    scaled = np.floor(values * (255 / full) + 0.5).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def load_image(path_or_image: str | os.PathLike[str] | Image.Image, *, exif_transpose: bool = True) -> Image.Image:
    """Open an image file (or take a PIL image) and return it as an RGB PIL image.

    Matches `transformers.image_utils.load_image` for local files: the EXIF orientation is
    applied, then `Image.convert("RGB")` (an alpha channel is dropped, as in the original LLaVA
    code's `Image.open(path).convert("RGB")`); 16- and 32-bit integer images are scaled to 8 bit
    first (`to_8bit`), where transformers clips them at 255. Note that `ClipImageProcessor` itself, like
    transformers' image processors, composites transparency onto white instead; this only
    matters for images with an alpha channel that skip `load_image`.

    Raises:
        FileNotFoundError: the path does not exist or is not a file.
        ValueError: the file cannot be read as an image.
        TypeError: the argument is neither a path nor a PIL image.
    """
    if isinstance(path_or_image, Image.Image):
        image = path_or_image
    elif isinstance(path_or_image, (str, os.PathLike)):
        path = Path(path_or_image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {str(path)!r}")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image file {str(path)!r}: {e}") from e
    else:
        raise TypeError(f"load_image expects a path or a PIL.Image.Image, got {type(path_or_image).__name__}")
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_8bit(image).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white.

    Same rule as transformers' `image_transforms.convert_to_rgb`: an image counts as transparent
    when it has an "A" band (RGBA, LA, PA, ...) or a `transparency` entry (palette/L images).
    16- and 32-bit integer images are scaled to 8 bit first (`to_8bit`; transformers clips them).
    """
    image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _pil_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1)


def _hw(value: Any, name: str) -> tuple[int, int]:
    """Parse an int / (h, w) / {"height", "width"} size into (height, width)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int, (height, width) or {{'height', 'width'}}, got {value!r}")


@dataclass
class ClipImageProcessor:
    """CLIP image preprocessing as used by LLaVA-1.5 (336 px, OpenAI CLIP statistics).

    Attributes:
        size: int = shortest edge after resize; (height, width) = exact resize size.
        crop_size: centre crop, int (square) or (height, width).
        resample: PIL resampling code (3 = bicubic).
        rescale_factor: multiplier applied to uint8 values (1/255).
        image_mean, image_std: per-channel normalisation.
        pad_to_square: original LLaVA-1.5 `image_aspect_ratio="pad"` (transformers'
            `LlavaImageProcessor(do_pad=True)`): pad to a square of the mean colour before resizing.
        do_resize, do_center_crop, do_rescale, do_normalize, do_convert_rgb: step switches.
    """

    size: int | tuple[int, int] = 336
    crop_size: int | tuple[int, int] = 336
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    pad_to_square: bool = False
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, int) and not isinstance(self.size, bool):
            if self.size <= 0:
                raise ValueError(f"size must be positive, got {self.size}")
        else:
            self.size = _hw(self.size, "size")
            if min(self.size) <= 0:
                raise ValueError(f"size must be positive, got {self.size}")
        self.crop_size = _hw(self.crop_size, "crop_size")
        if min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if int(self.resample) not in _PIL_RESAMPLE_CODES:
            raise ValueError(
                f"resample must be a PIL resampling code {sorted(_PIL_RESAMPLE_CODES)}, got {self.resample!r}"
            )
        self.resample = int(self.resample)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean and image_std need 3 values (RGB), got {self.image_mean} and {self.image_std}"
            )
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std}")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every output image (the crop, or the resize target without a crop)."""
        if self.do_center_crop:
            return self.crop_size  # type: ignore[return-value]
        if self.do_resize and isinstance(self.size, tuple):
            return self.size
        raise ValueError("output size depends on the input image when neither a crop nor a fixed resize is set")

    @classmethod
    def from_preprocessor_config(cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> ClipImageProcessor:
        """Build from a hub `preprocessor_config.json` (a file, its directory, or the parsed dict).

        Reads `size` ({"shortest_edge"}, {"height","width"} or int), `crop_size` (int or
        {"height","width"}), `resample`, `rescale_factor`, `image_mean`, `image_std`, the `do_*`
        switches and `do_pad` (pad-to-square; only for Llava image processors, since
        `CLIPImageProcessor.do_pad` means batch padding, a no-op after a centre crop).
        Missing fields keep the LLaVA-1.5 defaults.
        """
        cfg = read_preprocessor_config(path_or_dict)
        kwargs: dict[str, Any] = {}
        if "size" in cfg and cfg["size"] is not None:
            kwargs["size"] = _parse_resize(cfg["size"])
        if "crop_size" in cfg and cfg["crop_size"] is not None:
            kwargs["crop_size"] = _hw(cfg["crop_size"], "crop_size")
        for key in ("resample", "rescale_factor", "image_mean", "image_std"):
            if cfg.get(key) is not None:
                kwargs[key] = cfg[key]
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(key) is not None:
                kwargs[key] = bool(cfg[key])
        processor_type = str(cfg.get("image_processor_type") or "LlavaImageProcessor")
        if cfg.get("do_pad") and processor_type.startswith("LlavaImageProcessor"):
            kwargs["pad_to_square"] = True
        return cls(**kwargs)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess one image or a list of images -> float32 tensor [N, 3, H, W]."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        out = [self.preprocess_one(img) for img in images]
        shapes = {tuple(t.shape) for t in out}
        if len(shapes) > 1:
            raise ValueError(f"preprocessed images differ in shape {sorted(shapes)}; set a crop or a fixed size")
        return torch.stack(out)

    def preprocess_one(self, image: Image.Image) -> torch.Tensor:
        """Preprocess a single PIL image -> float32 tensor [3, H, W]."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r} and do_convert_rgb=False; pass RGB images")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has an empty side: {image.width}x{image.height}")
        if self.pad_to_square:
            image = self._pad_to_square(image)
        if self.do_resize:
            height, width = self._resize_size(image.height, image.width)
            image = image.resize((width, height), resample=_PIL_RESAMPLE_CODES[self.resample])
        pixels = _pil_to_uint8_chw(image)  # [3, H, W] uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, *self.crop_size)  # type: ignore[misc]
        x = pixels.to(torch.float32)
        if self.do_rescale:
            # float64 product then one cast, as NumPy does in transformers' `rescale`
            x = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    def _pad_to_square(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        color = tuple(int(m * 255) for m in self.image_mean)
        canvas = Image.new("RGB", (side, side), color)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def _resize_size(self, height: int, width: int) -> tuple[int, int]:
        """Target (height, width): torchvision's shortest-edge rule with int() truncation."""
        if isinstance(self.size, tuple):
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def _parse_resize(value: Any) -> int | tuple[int, int]:
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            if value.get("longest_edge") is not None:
                raise ValueError(f"size with both shortest_edge and longest_edge is not supported: {dict(value)}")
            return int(value["shortest_edge"])
        return _hw(value, "size")
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # an int means the shortest edge (CLIP's default_to_square=False)
    return _hw(value, "size")


def _center_crop(pixels: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """Centre crop [C, H, W]; zero-pads first (extra pixel at the start) if the image is smaller."""
    _, height, width = pixels.shape
    if height < crop_h or width < crop_w:
        new_h, new_w = max(height, crop_h), max(width, crop_w)
        top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
        padded = pixels.new_zeros((pixels.shape[0], new_h, new_w))
        padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = pixels
        # offsets are relative to the unpadded image, shifted by the padding
        top = (height - crop_h) // 2 + top_pad
        left = (width - crop_w) // 2 + left_pad
        return padded[:, max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    return pixels[:, top : top + crop_h, left : left + crop_w]
