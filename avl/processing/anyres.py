"""LLaVA-NeXT ("anyres") tiling: the geometry shared by the processor and the model, and the
image preprocessing of transformers' `LlavaNextImageProcessor` (PIL path).

Every image becomes tiles of `tile x tile` pixels (336 for LLaVA-1.6):

1. the best grid resolution among `image_grid_pinpoints` ((height, width) pairs, multiples of
   the tile): the one that keeps the most of the image's pixels when the image is scaled to fit
   inside it, ties broken by the least wasted area (`select_best_resolution`);
2. the image is resized to fit that resolution, aspect ratio kept, the long side exact and the
   short side `ceil(short * scale)` (`resized_size`); PIL resampling on uint8 (bicubic);
3. it is pasted centred on a black canvas of the best resolution (offset `(target - size) // 2`,
   the extra pixel after), and the canvas is cut into tiles, row by row;
4. a base tile: the whole image squashed to `tile x tile`; it comes first;
5. each tile then goes through the CLIP steps (`ClipImageProcessor`: shortest-edge resize and
   centre crop, both no-ops on a `tile x tile` tile, rescale, normalise).

The model puts the base tile's features first, then the grid's features as one map of
`rows * (tile / patch)` by `cols * (tile / patch)` positions with the padding rows (or columns)
cut off again (`unpadded_window`) and one `image_newline` feature at the end of each row. So
the number of image tokens of an image depends on its size: `num_image_tokens`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from avl.processing.files import read_preprocessor_config
from avl.processing.image import (
    _PIL_RESAMPLE_CODES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipImageProcessor,
    to_rgb,
)

Size = tuple[int, int]  # (height, width)

# The hub's LLaVA-1.6 (llava-v1.6-vicuna-7b-hf, -13b, -mistral-7b) grid resolutions, (height, width).
DEFAULT_GRID_PINPOINTS: tuple[Size, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def check_grid_pinpoints(pinpoints: Any, tile: int) -> tuple[Size, ...]:
    """Validate `image_grid_pinpoints` (non-empty (height, width) pairs, positive multiples of `tile`).

    Raises:
        ValueError: naming the bad entry. A resolution that is not a multiple of the tile would
            give a ragged last row of tiles, which the model's feature grid cannot represent.
    """
    if isinstance(pinpoints, (str, bytes)) or not isinstance(pinpoints, Sequence) or len(pinpoints) == 0:
        raise ValueError(f"image_grid_pinpoints={pinpoints!r} must be a non-empty list of [height, width] pairs")
    out = []
    for entry in pinpoints:
        ok = isinstance(entry, Sequence) and len(entry) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry
        )
        if not ok:
            raise ValueError(f"image_grid_pinpoints entry {entry!r} must be a [height, width] pair of positive ints")
        if entry[0] % tile or entry[1] % tile:
            raise ValueError(
                f"image_grid_pinpoints entry {list(entry)} is not a multiple of the tile size {tile} "
                "(vision_config.image_size / crop_size)"
            )
        out.append((int(entry[0]), int(entry[1])))
    return tuple(out)


def check_image_size(image_size: Any) -> Size:
    """An image's (height, width) as two positive ints (a pair, list or 1-D tensor)."""
    if hasattr(image_size, "tolist"):
        image_size = image_size.tolist()
    ok = isinstance(image_size, Sequence) and len(image_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size
    )
    if not ok:
        raise ValueError(f"an image size must be (height, width), two positive ints; got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """The (height, width) among `pinpoints` that shows most of the image, then wastes least area.

    The image scaled to fit each resolution keeps `int(w * s) * int(h * s)` pixels (at most its
    own); the largest wins, ties go to the smallest `resolution area - kept pixels`; the first
    such resolution in list order wins a full tie (transformers' `select_best_resolution`).
    """
    height, width = image_size
    best, best_kept, best_waste = pinpoints[0], 0, float("inf")
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = target_w * target_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (target_h, target_w), kept, waste
    return best


def resized_size(image_size: Size, target: Size) -> Size:
    """Aspect-preserving size inside `target`: the limiting side exact, the other `ceil`ed (at most the target)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(image_size: Size, pinpoints: Sequence[Size], tile: int) -> Size:
    """(rows, cols) of tiles of the image's best resolution (the base tile not counted)."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return best_h // tile, best_w // tile


def num_tiles(image_size: Size, pinpoints: Sequence[Size], tile: int) -> int:
    """Tiles of one image: the base tile plus rows x cols grid tiles."""
    rows, cols = grid_shape(image_size, pinpoints, tile)
    return 1 + rows * cols


def unpadded_window(image_size: Size, grid: Size) -> tuple[int, int, int, int]:
    """(row_start, row_end, col_start, col_end) of a `grid` = (height, width) feature map that
    covers the image itself, not the padding around it (transformers' `unpad_image`).

    The image's side across the padding is scaled like the side along it and rounded to 7
    decimals before `int`; the padding `(grid - scaled) // 2` is cut from both ends.
    """
    height, width = image_size
    grid_h, grid_w = grid
    if width / height > grid_w / grid_h:  # wider than the grid: padding above and below
        scaled = int(round(height * (grid_w / width), 7))
        pad = (grid_h - scaled) // 2
        return pad, grid_h - pad, 0, grid_w
    scaled = int(round(width * (grid_h / height), 7))
    pad = (grid_w - scaled) // 2
    return 0, grid_h, pad, grid_w - pad


def num_image_tokens(image_size: Size, pinpoints: Sequence[Size], tile: int, patch: int) -> int:
    """Image tokens of one image (CLS dropped, the "default" strategy): the base tile's
    `(tile / patch)^2` features plus the unpadded grid map with one newline per row.

    Equals transformers' `LlavaNextProcessor._get_number_of_features(h, w, tile, tile) - 1` with
    `num_additional_image_tokens=1`, the count the llava-hf processors expand `<image>` to.
    """
    size, side = check_image_size(image_size), tile // patch
    rows, cols = grid_shape(size, pinpoints, tile)
    r0, r1, c0, c1 = unpadded_window(size, (rows * side, cols * side))
    return side * side + (r1 - r0) * (c1 - c0 + 1)


def grid_tiles(image: Image.Image, pinpoints: Sequence[Size], tile: int, resample: int) -> list[Image.Image]:
    """The anyres grid of an RGB image (steps 1-3 above): resized into its best resolution with PIL
    resampling code `resample`, pasted centred on black, cut into `tile x tile` tiles row by row."""
    best_h, best_w = select_best_resolution((image.height, image.width), pinpoints)
    new_h, new_w = resized_size((image.height, image.width), (best_h, best_w))
    canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
    resized = image.resize((new_w, new_h), resample=_PIL_RESAMPLE_CODES[resample])
    canvas.paste(resized, ((best_w - new_w) // 2, (best_h - new_h) // 2))
    return [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, best_h, tile) for x in range(0, best_w, tile)]


@dataclass
class LlavaNextImageProcessor:
    """LLaVA-NeXT anyres preprocessing, equal to transformers' `LlavaNextImageProcessor` (PIL path).

    Attributes:
        image_grid_pinpoints: candidate grid resolutions, (height, width) multiples of the tile.
        size: shortest edge of each tile's CLIP resize (int), or a fixed (height, width); also the
            base tile's size (an int n means n x n).
        crop_size: CLIP centre crop; its height is the tile size.
        resample, rescale_factor, image_mean, image_std, do_*: as in `ClipImageProcessor`.
    """

    image_grid_pinpoints: Sequence[Sequence[int]] = DEFAULT_GRID_PINPOINTS
    size: int | tuple[int, int] = 336
    crop_size: int | tuple[int, int] = 336
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    tile_processor: ClipImageProcessor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # the per-tile CLIP steps; tiles are RGB already
        self.tile_processor = ClipImageProcessor(
            size=self.size, crop_size=self.crop_size, resample=self.resample, rescale_factor=self.rescale_factor,
            image_mean=self.image_mean, image_std=self.image_std, do_resize=self.do_resize,
            do_center_crop=self.do_center_crop, do_rescale=self.do_rescale, do_normalize=self.do_normalize,
            do_convert_rgb=False,
        )
        self.size, self.crop_size = self.tile_processor.size, self.tile_processor.crop_size
        self.image_grid_pinpoints = check_grid_pinpoints(self.image_grid_pinpoints, self.tile)

    @property
    def tile(self) -> int:
        """Side of a tile in pixels (transformers' "patch_size" of the processor: `crop_size["height"]`)."""
        return self.crop_size[0]  # type: ignore[index]

    @property
    def base_size(self) -> Size:
        """(height, width) the whole image is squashed to for the base tile."""
        return self.size if isinstance(self.size, tuple) else (self.size, self.size)

    @classmethod
    def from_preprocessor_config(
        cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]
    ) -> LlavaNextImageProcessor:
        """Build from a hub `preprocessor_config.json` (file, its directory, or the parsed dict).

        The CLIP fields are read as `ClipImageProcessor.from_preprocessor_config` reads them, plus
        `image_grid_pinpoints`. `do_pad` (batch padding of the tile dimension) is always on here.
        """
        cfg = read_preprocessor_config(path_or_dict)
        clip = ClipImageProcessor.from_preprocessor_config({**cfg, "do_pad": False})
        return cls(
            image_grid_pinpoints=DEFAULT_GRID_PINPOINTS if cfg.get("image_grid_pinpoints") is None
            else cfg["image_grid_pinpoints"],
            size=clip.size, crop_size=clip.crop_size, resample=clip.resample, rescale_factor=clip.rescale_factor,
            image_mean=clip.image_mean, image_std=clip.image_std, do_resize=clip.do_resize,
            do_center_crop=clip.do_center_crop, do_rescale=clip.do_rescale, do_normalize=clip.do_normalize,
            do_convert_rgb=clip.do_convert_rgb,
        )

    def num_tiles(self, image_size: Size) -> int:
        """Tiles (base included) of an image of (height, width) `image_size`."""
        return num_tiles(check_image_size(image_size), self.image_grid_pinpoints, self.tile)

    def num_image_tokens(self, image_size: Size, patch_size: int) -> int:
        """Image tokens of an image of (height, width) `image_size` for a vision patch of `patch_size`."""
        return num_image_tokens(check_image_size(image_size), self.image_grid_pinpoints, self.tile, patch_size)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Preprocess images -> `pixel_values` [N, max_tiles, 3, tile, tile] float32 (images with
        fewer tiles padded with zero tiles at the end) and `image_sizes` [N, 2] int64 (height, width)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        tiles, sizes = zip(*(self.preprocess_one(image) for image in images))
        most = max(t.shape[0] for t in tiles)
        pixel_values = torch.zeros((len(tiles), most, *tiles[0].shape[1:]), dtype=tiles[0].dtype)
        for i, t in enumerate(tiles):
            pixel_values[i, : t.shape[0]] = t
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.int64)}

    def preprocess_one(self, image: Image.Image) -> tuple[torch.Tensor, Size]:
        """One PIL image -> its tiles [n_tiles, 3, tile, tile] (base first) and its (height, width)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r} and do_convert_rgb=False; pass RGB images")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has an empty side: {image.width}x{image.height}")
        size = (image.height, image.width)
        tiles = [self._resize(image, self.base_size),
                 *grid_tiles(image, self.image_grid_pinpoints, self.tile, self.resample)]
        return torch.stack([self.tile_processor.preprocess_one(t) for t in tiles]), size

    def _resize(self, image: Image.Image, size: Size) -> Image.Image:
        return image.resize((size[1], size[0]), resample=_PIL_RESAMPLE_CODES[self.resample])



__all__ = [
    "DEFAULT_GRID_PINPOINTS",
    "LlavaNextImageProcessor",
    "check_grid_pinpoints",
    "check_image_size",
    "grid_shape",
    "grid_tiles",
    "num_image_tokens",
    "num_tiles",
    "resized_size",
    "select_best_resolution",
    "unpadded_window",
]
