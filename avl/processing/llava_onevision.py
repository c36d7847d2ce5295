"""LLaVA-OneVision preprocessing: the anyres_max_9 image processor, the token count of an image, the
processor (Qwen2 tokenizer + images -> transformers' model inputs) and the chat prompt.

Images (transformers' `LlavaOnevisionImageProcessor`, PIL path):

- an image alone in its prompt group (`batch_num_images` entry 1; every image of a flat list) is
  tiled like LLaVA-NeXT's anyres (`avl.processing.anyres`: best grid resolution, aspect-kept
  resize, centred black padding, tiles row by row), after a base tile, the whole image squashed
  to `size`; the grid resolutions are 384 px multiples up to 6 x 6 tiles by default;
- an image that shares its group with others (a multi-image prompt given as a nested list) is
  padded to a square of the mean colour and resized to `size`: one tile;
- every tile is then resized to `size` (a no-op at the tile size), optionally centre-cropped,
  rescaled and normalised (`avl.processing.image.ClipImageProcessor` steps).

Token count of an image (`num_image_tokens`): the base tile's `side^2` features (`side = tile //
patch`, no class token), then for a tiled image its unpadded grid map of h x w features,
downsampled when it holds more than max (anyres_max_9: 9 tiles) tiles' worth: with `ratio =
sqrt(h * w / (max * side^2))`, if `ratio > 1.1` the map becomes `int(h // ratio) x int(w // ratio)`
(bilinear interpolation in the model); one `image_newline` feature ends each row. A single-tile
image has `side^2 + 1` (the base tile and one newline).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from avl.processing.anyres import (
    Size,
    check_grid_pinpoints,
    check_image_size,
    grid_shape,
    grid_tiles,
    num_tiles,
    unpadded_window,
)
from avl.processing.chat_template import Message, read_chat_template, render_chat_template
from avl.processing.files import read_optional_json, read_preprocessor_config
from avl.processing.image import (
    _PIL_RESAMPLE_CODES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipImageProcessor,
    ImageLike,
    _hw,
    _parse_resize,
    to_rgb,
)
from avl.processing.llava import LlavaProcessor, image_token_id_of
from avl.processing.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
TILE = 384
# transformers' default `image_grid_pinpoints` of LLaVA-OneVision, (height, width): 1..6 x 1..6 tiles
ONEVISION_GRID_PINPOINTS: tuple[Size, ...] = tuple((TILE * r, TILE * c) for r in range(1, 7) for c in range(1, 7))
DEFAULT_ASPECT_RATIO = "anyres_max_9"

# The chat template of the llava-hf LLaVA-OneVision checkpoints (chat_template.json of
# llava-hf/llava-onevision-qwen2-*-ov-hf; the model cards' prompt
# "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\n"),
# used when a checkpoint directory ships none.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """The tile budget of a `vision_aspect_ratio` "anyres_max_N": N.

    Raises:
        ValueError: any other value (transformers reads only this form).
    """
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio) if isinstance(vision_aspect_ratio, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported; allowed: 'anyres_max_N', N >= 1")
    return int(match.group(1))


def downsampled_size(height: int, width: int, side: int, max_tiles: int) -> Size:
    """(height, width) of an unpadded grid map of `height x width` features after the max-tiles rule:
    unchanged unless it holds more than 1.1^2 x `max_tiles` tiles of `side x side` features."""
    ratio = math.sqrt(height * width / (max_tiles * side * side))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def onevision_num_tiles(image_size: Size, pinpoints: Sequence[Size], tile: int, multi_image: bool) -> int:
    """Tiles of one image: 1 in a multi-image group, else the base tile plus its anyres grid."""
    return 1 if multi_image else num_tiles(check_image_size(image_size), pinpoints, tile)


def onevision_num_image_tokens(image_size: Size, pinpoints: Sequence[Size], tile: int, patch: int, max_tiles: int,
                               multi_image: bool) -> int:
    """Image tokens of one image (module docstring); equals transformers' `LlavaOnevisionProcessor`
    count with `vision_feature_select_strategy="full"`."""
    size, side = check_image_size(image_size), tile // patch
    if multi_image:
        return side * side + 1
    rows, cols = grid_shape(size, pinpoints, tile)
    r0, r1, c0, c1 = unpadded_window(size, (rows * side, cols * side))
    height, width = downsampled_size(r1 - r0, c1 - c0, side, max_tiles)
    return side * side + height * (width + 1)


def multi_image_flags(batch_num_images: Sequence[int] | torch.Tensor | None, n_images: int) -> list[bool]:
    """Per image, whether it shares its group with other images (then it is one padded square tile).

    `batch_num_images` holds the images per group (prompt) in order, summing to `n_images`; None
    means one group per image (a flat list of images), as in transformers.
    """
    if batch_num_images is None:
        return [False] * n_images
    counts = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else list(batch_num_images)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts) or sum(counts) != n_images:
        raise ValueError(
            f"batch_num_images={counts} must be ints >= 1 (the images of each prompt, in order) summing to the "
            f"{n_images} image(s) given"
        )
    return [n > 1 for n in counts for _ in range(n)]


@dataclass
class LlavaOnevisionImageProcessor:
    """LLaVA-OneVision image preprocessing, equal to transformers' `LlavaOnevisionImageProcessor` (PIL path).

    Attributes:
        image_grid_pinpoints: candidate grid resolutions, (height, width) multiples of the tile.
        size: the resize of every tile and of the base / square image: (height, width), or an int
            shortest edge (then the base image is `size x size`).
        crop_size: (height, width) of the centre crop (with `do_center_crop`); when given, its
            height is also the tile size, else `size`'s height is.
        resample, rescale_factor, image_mean, image_std, do_*: as in `ClipImageProcessor`; the
            multi-image square padding uses the colour `int(m * 255)` of `image_mean`.
    """

    image_grid_pinpoints: Sequence[Sequence[int]] = ONEVISION_GRID_PINPOINTS
    size: int | tuple[int, int] = (TILE, TILE)
    crop_size: tuple[int, int] | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    do_resize: bool = True
    do_center_crop: bool = False
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    tile_processor: ClipImageProcessor = field(init=False, repr=False)
    square_processor: ClipImageProcessor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.crop_size is not None:
            self.crop_size = _hw(self.crop_size, "crop_size")
        steps = dict(
            size=self.size, crop_size=self.crop_size or self.size, resample=self.resample,
            rescale_factor=self.rescale_factor, image_mean=self.image_mean, image_std=self.image_std,
            do_resize=self.do_resize, do_center_crop=self.do_center_crop, do_rescale=self.do_rescale,
            do_normalize=self.do_normalize, do_convert_rgb=False,
        )
        self.tile_processor = ClipImageProcessor(**steps)
        self.square_processor = ClipImageProcessor(**steps, pad_to_square=True)
        self.size = self.tile_processor.size
        self.image_grid_pinpoints = check_grid_pinpoints(self.image_grid_pinpoints, self.tile)

    @property
    def tile(self) -> int:
        """Side of a grid tile in pixels (transformers' `patch_size`: crop height, else size height / shortest edge)."""
        if self.crop_size is not None:
            return self.crop_size[0]
        return self.size[0] if isinstance(self.size, tuple) else self.size

    @property
    def base_size(self) -> Size:
        """(height, width) the whole image is squashed to for the base tile."""
        return self.size if isinstance(self.size, tuple) else (self.size, self.size)

    @classmethod
    def from_preprocessor_config(
        cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]
    ) -> LlavaOnevisionImageProcessor:
        """Build from a hub `preprocessor_config.json` (file, its directory, or the parsed dict).

        Missing fields keep transformers' defaults (384 x 384, OpenAI CLIP statistics, bicubic, no
        crop). `do_pad` (batch padding of the tile dimension) is always on here.
        """
        cfg = read_preprocessor_config(path_or_dict)
        kwargs: dict[str, Any] = {}
        if cfg.get("image_grid_pinpoints") is not None:
            kwargs["image_grid_pinpoints"] = cfg["image_grid_pinpoints"]
        if cfg.get("size") is not None:
            kwargs["size"] = _parse_resize(cfg["size"])
        if cfg.get("crop_size") is not None:
            kwargs["crop_size"] = _hw(cfg["crop_size"], "crop_size")
        for key in ("resample", "rescale_factor", "image_mean", "image_std"):
            if cfg.get(key) is not None:
                kwargs[key] = cfg[key]
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(key) is not None:
                kwargs[key] = bool(cfg[key])
        return cls(**kwargs)

    def __call__(self, images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]]
                 ) -> dict[str, torch.Tensor]:
        """Preprocess one image, a flat list (each image its own group), or one list per prompt
        (empty lists skipped) -> `pixel_values`, `image_sizes`, `batch_num_images` (see `preprocess`)."""
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if images and all(isinstance(group, (list, tuple)) for group in images):
            groups = [list(group) for group in images if group]
            return self.preprocess([im for group in groups for im in group], [len(group) for group in groups])
        return self.preprocess(images, [1] * len(images))

    def preprocess(self, images: Sequence[Image.Image], batch_num_images: Sequence[int]) -> dict[str, torch.Tensor]:
        """Images in order and the images per group -> `pixel_values` [N, max_tiles, 3, T, T] float32
        (images with fewer tiles padded with zero tiles at the end), `image_sizes` [N, 2] int64
        (height, width) and `batch_num_images` [G] int64."""
        if len(images) == 0:
            raise ValueError("no images given")
        multi = multi_image_flags(batch_num_images, len(images))
        tiles, sizes = zip(*(self.preprocess_one(image, m) for image, m in zip(images, multi)))
        most = max(t.shape[0] for t in tiles)
        pixel_values = torch.zeros((len(tiles), most, *tiles[0].shape[1:]), dtype=tiles[0].dtype)
        for i, t in enumerate(tiles):
            pixel_values[i, : t.shape[0]] = t
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.int64),
                "batch_num_images": torch.tensor(list(batch_num_images), dtype=torch.int64)}

    def preprocess_one(self, image: Image.Image, multi_image: bool = False) -> tuple[torch.Tensor, Size]:
        """One PIL image -> its tiles [n_tiles, 3, T, T] (base first; one square tile when
        `multi_image`) and its (height, width)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r} and do_convert_rgb=False; pass RGB images")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has an empty side: {image.width}x{image.height}")
        size = (image.height, image.width)
        if multi_image:
            return self.square_processor.preprocess_one(image)[None], size
        base = image.resize(self.base_size[::-1], resample=_PIL_RESAMPLE_CODES[self.resample])
        tiles = [base, *grid_tiles(image, self.image_grid_pinpoints, self.tile, self.resample)]
        return torch.stack([self.tile_processor.preprocess_one(t) for t in tiles]), size


def onevision_prompt(question: str, n_images: int = 1, *, template: str = ONEVISION_CHAT_TEMPLATE,
                     system: str | None = None) -> str:
    """The single-turn chat prompt for `question` after `n_images` images, rendered with `template`
    (a checkpoint's own `chat_template`; llava-hf's by default), generation prompt included.

    `onevision_prompt("What is this?")` ->
    `"<|im_start|>user <image>\\nWhat is this?<|im_end|>\\n<|im_start|>assistant\\n"`.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0:
        raise ValueError(f"n_images must be an int >= 0, got {n_images!r}")
    messages: list[Message] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]})
    return render_chat_template(template, messages, add_generation_prompt=True)


class LlavaOnevisionProcessor:
    """Qwen2 tokenizer + OneVision image processor -> the inputs of transformers' `LlavaOnevisionProcessor`.

    Args:
        tokenizer: the checkpoint's tokenizer (`tokenizer.json`); `image_token` must encode to one id.
        image_processor: the OneVision image preprocessing.
        patch_size: the vision tower's patch size (14); `tile // patch_size` features per tile side
            (27 for 384 px tiles).
        vision_aspect_ratio: "anyres_max_N".
        chat_template: the checkpoint's chat template (llava-hf's when None).
        image_token_id, image_token, pad_token_id: as in `LlavaProcessor`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: LlavaOnevisionImageProcessor,
        *,
        patch_size: int = 14,
        vision_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
        chat_template: str | None = None,
        image_token_id: int | None = None,
        image_token: str = IMAGE_TOKEN,
        pad_token_id: int | None = None,
    ) -> None:
        tile = image_processor.tile
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or not 1 <= patch_size <= tile:
            raise ValueError(f"patch_size={patch_size!r} must be an int in [1, tile size {tile}]")
        self.max_tiles = max_tiles_of(vision_aspect_ratio)
        # the text side (placeholder checks, image matching, left padding) is LLaVA-1.5's; its fixed count is unused
        self._text = LlavaProcessor(
            tokenizer, image_processor.tile_processor, num_image_tokens=(tile // patch_size) ** 2,
            image_token_id=image_token_id, image_token=image_token, pad_token_id=pad_token_id,
        )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.patch_size = patch_size
        self.chat_template = chat_template or ONEVISION_CHAT_TEMPLATE
        self.image_token = image_token
        self.image_token_id: int = self._text.image_token_id
        self.pad_token_id: int | None = self._text.pad_token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> LlavaOnevisionProcessor:
        """Load from a checkpoint directory: `tokenizer.json` (+ its config), `preprocessor_config.json`
        (transformers' defaults if absent), the chat template (`read_chat_template`), and from
        `processor_config.json`, else `config.json`: the per-tile feature count (`num_image_tokens`,
        a square of tile / patch) or the vision `patch_size`, and `vision_aspect_ratio`.

        Raises:
            ValueError: a "default" `vision_feature_select_strategy` (OneVision's tower has no class
                token to drop), a `num_image_tokens` that does not tile the image, or an image token
                id that disagrees between the tokenizer and `config.json`.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {str(root)!r}")
        tokenizer = Tokenizer.from_dir(root)
        if (root / "preprocessor_config.json").is_file():
            image_processor = LlavaOnevisionImageProcessor.from_preprocessor_config(root / "preprocessor_config.json")
        else:
            image_processor = LlavaOnevisionImageProcessor()
        config = read_optional_json(root / "config.json")
        processor_config = read_optional_json(root / "processor_config.json")
        for source, cfg in (("processor_config.json", processor_config), ("config.json", config)):
            if cfg.get("vision_feature_select_strategy") not in (None, "full"):
                raise ValueError(
                    f"vision_feature_select_strategy={cfg['vision_feature_select_strategy']!r} in {source} is not "
                    "supported by LLaVA-OneVision (SigLIP has no class token); allowed: ['full']"
                )
        patch_size = _patch_size(processor_config, config, image_processor.tile, root)
        aspect = processor_config.get("vision_aspect_ratio") or config.get("vision_aspect_ratio") or DEFAULT_ASPECT_RATIO
        return cls(tokenizer, image_processor, patch_size=patch_size, vision_aspect_ratio=aspect,
                   chat_template=read_chat_template(root), image_token_id=image_token_id_of(tokenizer, config, root))

    def num_image_tokens(self, image_size: Size, multi_image: bool = False) -> int:
        """Image tokens an image of (height, width) `image_size` expands its placeholder to."""
        p = self.image_processor
        return onevision_num_image_tokens(image_size, p.image_grid_pinpoints, p.tile, self.patch_size, self.max_tiles,
                                          multi_image)

    def prompt(self, question: str, n_images: int = 1, *, system: str | None = None) -> str:
        """`onevision_prompt` with this checkpoint's chat template."""
        return onevision_prompt(question, n_images, template=self.chat_template, system=system)

    def __call__(
        self,
        prompts: str | Sequence[str],
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize, preprocess images, expand each placeholder to its image's count, left-pad.

        Args:
            prompts: one prompt or a batch; each `<image>` marks where one image goes.
            images: None; a flat list (one image per placeholder, in order across the batch; each
                image tiled); or one list per prompt (a prompt's images tiled when it has one, one
                square tile each when it has several), as transformers groups them.

        Returns:
            `input_ids`, `attention_mask` [B, L] int64 (left-padded), and with images
            `pixel_values` [N, max_tiles, 3, T, T] float32, `image_sizes` [N, 2] int64,
            `batch_num_images` [G] int64 (images per prompt that has any).
        """
        token_ids, pil_images = self._text.tokenize(prompts, images)
        if not pil_images:
            return self._text.pack(token_ids, [])
        nested = not isinstance(images, (Image.Image, str, os.PathLike)) and all(
            isinstance(group, (list, tuple)) for group in images)
        groups = [len(group) for group in images if group] if nested else [1] * len(pil_images)
        vision = self.image_processor.preprocess(pil_images, groups)
        multi = multi_image_flags(groups, len(pil_images))
        lengths = [self.num_image_tokens(size, m) for size, m in zip(vision["image_sizes"].tolist(), multi)]
        return {**self._text.pack(token_ids, lengths), **vision}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids (image and pad tokens are special, so skipped by default)."""
        return self._text.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each row of a batch."""
        return self._text.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def _patch_size(processor_config: dict[str, Any], config: dict[str, Any], tile: int, root: Path) -> int:
    """The vision patch size: from `num_image_tokens` (features of one tile) or a `patch_size`."""
    per_tile = processor_config.get("num_image_tokens")
    if per_tile is not None:
        side = math.isqrt(int(per_tile))
        if side * side != int(per_tile) or not 1 <= side <= tile or tile // (tile // side) != side:
            raise ValueError(
                f"num_image_tokens={per_tile} in processor_config.json must be side^2 for a patch size p with "
                f"tile // p = side (tile size {tile})"
            )
        return tile // side
    patch = processor_config.get("patch_size") or (config.get("vision_config") or {}).get("patch_size")
    if patch is None:
        raise ValueError(
            f"cannot infer the patch size in {str(root)!r}: no num_image_tokens / patch_size in processor_config.json "
            "and no vision_config.patch_size in config.json"
        )
    return int(patch)


__all__ = [
    "DEFAULT_ASPECT_RATIO",
    "ONEVISION_CHAT_TEMPLATE",
    "ONEVISION_GRID_PINPOINTS",
    "LlavaOnevisionImageProcessor",
    "LlavaOnevisionProcessor",
    "downsampled_size",
    "max_tiles_of",
    "multi_image_flags",
    "onevision_num_image_tokens",
    "onevision_num_tiles",
    "onevision_prompt",
]
