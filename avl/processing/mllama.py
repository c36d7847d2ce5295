"""Llama-3.2-Vision input processing: tiled image preprocessing, the cross-attention mask, the chat prompt.

Images (arithmetic as transformers' `MllamaImageProcessor`, PIL backend, so results are bit-identical):

1. convert to RGB (transparency composited onto white);
2. choose a tile canvas: among the layouts of `rows x cols <= max_image_tiles` tiles, the one whose
   scale factor min(canvas_h / h, canvas_w / w) is the smallest that is >= 1 (least upscaling), or,
   if every canvas is smaller than the image, the largest (least downscaling); ties go to the
   smallest canvas area, then to the first layout in `supported_aspect_ratios` order;
3. resize the image to fit that canvas, keeping its aspect ratio (each side clipped to
   [tile_size, canvas side] first; `floor` on the scaled side), PIL on uint8;
4. pad with zeros at the bottom and right to the canvas, then rescale (float64, cast to float32)
   and normalise in float32;
5. split into `rows * cols` tiles in row-major order, padded with zero tiles to `max_image_tiles`.

An image's aspect-ratio id is its layout's 1-based index among
`(r, c) for r in 1..n for c in 1..n if r * c <= n` (n = `max_image_tiles`), 0 for no image.

The cross-attention mask [B, L, images, tiles] lets each text row attend the tiles of the image
whose `<|image|>` token precedes it: an image's span runs from its token to the next `<|image|>`
token (or the end); consecutive `<|image|>` tokens share the span that follows the last of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from avl.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageLike, _pil_to_uint8_chw, load_image, to_rgb
from avl.processing.files import read_preprocessor_config
from avl.processing.tokenizer import Tokenizer

IMAGE_TOKEN = "<|image|>"
BOS_TOKEN = "<|begin_of_text|>"
DEFAULT_DATE = "26 Jul 2024"  # the template's fallback; transformers renders today's date instead


@lru_cache(maxsize=16)
def supported_layouts(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile layouts (rows, cols) with rows * cols <= max_image_tiles, in aspect-ratio-id order."""
    n = max_image_tiles
    return tuple((r, c) for r in range(1, n + 1) for c in range(1, n + 1) if r * c <= n)


def choose_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """The tile layout (rows, cols) of an image of `height` x `width` (see the module docstring)."""
    layouts = supported_layouts(max_image_tiles)
    scales = [min(r * tile_size / height, c * tile_size / width) for r, c in layouts]
    upscales = [s for s in scales if s >= 1]
    best = min(upscales) if upscales else max(scales)
    tied = [layout for layout, s in zip(layouts, scales) if s == best]
    return min(tied, key=lambda rc: rc[0] * rc[1])  # min() keeps the first of equal areas


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """(new_height, new_width) of the image resized into the canvas, aspect ratio kept."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass
class TiledImages:
    """Preprocessed images of a batch, padded to the batch's most images and to `max_image_tiles` tiles."""

    pixel_values: Tensor  # [B, I, T, 3, tile, tile] float32, zero for padding tiles/images
    aspect_ratio_ids: Tensor  # [B, I] int64, 0 for padding images
    aspect_ratio_mask: Tensor  # [B, I, T] int64, 1 for real tiles (tile 0 always 1)
    num_tiles: list[list[int]]  # tiles of each real image



@dataclass
class MllamaImageProcessor:
    """Llama-3.2-Vision image preprocessing (defaults: the hub's `preprocessor_config.json` of
    meta-llama/Llama-3.2-11B-Vision: 560 px tiles, up to 4 tiles, bilinear, OpenAI CLIP statistics)."""

    tile_size: int = 560
    max_image_tiles: int = 4
    resample: int = int(Image.Resampling.BILINEAR)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise ValueError(f"tile_size={self.tile_size!r} is invalid; allowed: an int >= 1")
        if not isinstance(self.max_image_tiles, int) or self.max_image_tiles < 1:
            raise ValueError(f"max_image_tiles={self.max_image_tiles!r} is invalid; allowed: an int >= 1")
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ValueError(f"image_mean/image_std need 3 values, std non-zero; got {self.image_mean}, "
                             f"{self.image_std}")

    @classmethod
    def from_preprocessor_config(cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> MllamaImageProcessor:
        """From a hub `preprocessor_config.json` (file, its directory, or the parsed dict)."""
        cfg = read_preprocessor_config(path_or_dict)
        for switch in ("do_resize", "do_pad", "do_rescale", "do_normalize"):
            if cfg.get(switch) is False:
                raise ValueError(f"{switch}=False is not supported by Llama-3.2-Vision preprocessing")
        size = cfg.get("size") or {}
        if size and (size.get("height") != size.get("width")):
            raise ValueError(f"size={size!r} is invalid; allowed: square tiles (height == width)")
        kwargs: dict[str, Any] = {}
        if size:
            kwargs["tile_size"] = int(size["height"])
        for key in ("max_image_tiles", "resample", "rescale_factor", "image_mean", "image_std", "do_convert_rgb"):
            if cfg.get(key) is not None:
                kwargs[key] = cfg[key]
        return cls(**kwargs)

    def tile(self, image: Image.Image) -> tuple[Tensor, tuple[int, int]]:
        """One PIL image -> tiles [rows * cols, 3, tile, tile] float32 and the layout (rows, cols)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        image = to_rgb(image) if self.do_convert_rgb else image
        if image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r} and do_convert_rgb=False; pass RGB images")
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has an empty side: {image.width}x{image.height}")
        size = self.tile_size
        rows, cols = choose_canvas(image.height, image.width, self.max_image_tiles, size)
        new_h, new_w = fit_to_canvas(image.height, image.width, rows * size, cols * size, size)
        resized = _pil_to_uint8_chw(image.resize((new_w, new_h), resample=Image.Resampling(self.resample)))
        canvas = torch.zeros(3, rows * size, cols * size, dtype=torch.uint8)
        canvas[:, :new_h, :new_w] = resized
        x = (canvas.to(torch.float64) * self.rescale_factor).to(torch.float32)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std  # [3, rows*size, cols*size]
        tiles = x.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
        return tiles.contiguous(), (rows, cols)

    def __call__(self, images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]]) -> TiledImages:
        """One image, a list (one sample), or one list per sample -> `TiledImages`."""
        batch = _nest(images)
        if not any(batch):
            raise ValueError("no images given")
        layouts = supported_layouts(self.max_image_tiles)
        n_images, t, s = max(len(sample) for sample in batch), self.max_image_tiles, self.tile_size
        pixels = torch.zeros(len(batch), n_images, t, 3, s, s, dtype=torch.float32)
        ids = torch.zeros(len(batch), n_images, dtype=torch.int64)
        mask = torch.zeros(len(batch), n_images, t, dtype=torch.int64)
        mask[:, :, 0] = 1  # as published: tile 0 is marked even for padding images
        num_tiles: list[list[int]] = []
        for b, sample in enumerate(batch):
            num_tiles.append([])
            for i, image in enumerate(sample):
                tiles, layout = self.tile(image)
                pixels[b, i, : len(tiles)] = tiles
                ids[b, i] = layouts.index(layout) + 1
                mask[b, i, : len(tiles)] = 1
                num_tiles[b].append(len(tiles))
        return TiledImages(pixels, ids, mask, num_tiles)


def _nest(images: Any) -> list[list[Image.Image]]:
    if isinstance(images, Image.Image):
        return [[images]]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        return [list(sample) for sample in images]
    return [images]


def image_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) token span attending each image, in `<|image|>` token order (see the module docstring)."""
    starts = [i for i, t in enumerate(ids) if t == image_token_id]
    ends = starts[1:] + [len(ids)]
    for j in range(len(starts) - 2, -1, -1):
        if starts[j + 1] == starts[j] + 1:  # consecutive image tokens share the span after the last one
            ends[j] = ends[j + 1]
    return list(zip(starts, ends))


def cross_attention_mask(rows: Sequence[Sequence[int]], image_token_id: int, num_tiles: Sequence[Sequence[int]],
                         max_image_tiles: int, length: int | None = None) -> Tensor:
    """Dense cross-attention mask [B, L, I, T] int64 for token rows as fed to the model (left-padded
    rows give spans in padded coordinates); `num_tiles[b][i]` tiles of image i of sample b are attended."""
    length = max(len(r) for r in rows) if length is None else length
    n_images = max([len(t) for t in num_tiles] + [1])
    mask = torch.zeros(len(rows), length, n_images, max_image_tiles, dtype=torch.int64)
    for b, (ids, tiles) in enumerate(zip(rows, num_tiles)):
        spans = image_spans(list(ids), image_token_id)
        if len(spans) != len(tiles):
            raise ValueError(f"sample {b} has {len(spans)} {IMAGE_TOKEN} token(s) but {len(tiles)} image(s)")
        offset = length - len(ids)
        for i, ((start, end), n) in enumerate(zip(spans, tiles)):
            mask[b, offset + start: offset + end, i, :n] = 1
    return mask


def mllama_chat_prompt(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                       date_string: str = DEFAULT_DATE, bos_token: str = BOS_TOKEN) -> str:
    """Render a conversation with the Llama-3.2-Vision(-Instruct) chat template (tools not supported).

    Each message is `{"role": ..., "content": str | [{"type": "image"} | {"type": "text", "text": ...}]}`.
    Without images, a system header with the knowledge cutoff and `date_string` comes first (plus
    the system message, if any); with images a system message is an error, as in the template.
    """
    messages = list(messages)
    system = ""
    if messages and messages[0].get("role") == "system":
        system = _text_of(messages[0]["content"]).strip()
        messages = messages[1:]
    has_images = any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
                     for m in messages)
    if has_images and system:
        raise ValueError("Prompting with images is incompatible with system messages (Llama-3.2-Vision template)")
    out = [bos_token]
    if not has_images:
        out.append("<|start_header_id|>system<|end_header_id|>\n\n"
                   f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}<|eot_id|>")
    for message in messages:
        out.append(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n")
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(IMAGE_TOKEN if p.get("type") == "image" else p.get("text", "")
                       for p in content if p.get("type") in ("image", "text"))
        out.append("<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def mllama_prompt(question: str, n_images: int = 1) -> str:
    """Single user turn: `n_images` images, then `question`, then the assistant header."""
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0:
        raise ValueError(f"n_images={n_images!r} is invalid; allowed: an int >= 0")
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return mllama_chat_prompt([{"role": "user", "content": parts}])


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


class MllamaProcessor:
    """Tokenizer + tiled image preprocessing -> every input of `Mllama.prefill`.

    Prompts get `bos_token` (default: the tokenizer's, else `<|begin_of_text|>`) prepended when they
    lack it (after any leading `<|image|>` tokens, as transformers' `MllamaProcessor` does) and are
    then tokenized without the tokenizer's own special tokens, so each prompt starts with exactly
    one BOS. Batches are left-padded.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: MllamaImageProcessor, *,
                 image_token: str = IMAGE_TOKEN, bos_token: str | None = None, pad_token_id: int | None = None) -> None:
        image_token_id = tokenizer.token_to_id(image_token)
        if image_token_id is None or tokenizer.encode(image_token, add_special_tokens=False) != [image_token_id]:
            raise ValueError(f"the tokenizer must encode {image_token!r} to one id; add it as a special token")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token, self.image_token_id = image_token, image_token_id
        self.bos_token = bos_token or tokenizer.bos_token or BOS_TOKEN
        self.pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> MllamaProcessor:
        """Tokenizer files and `preprocessor_config.json` (11B defaults if absent) of a checkpoint directory."""
        root = Path(path)
        config = root / "preprocessor_config.json"
        images = MllamaImageProcessor.from_preprocessor_config(config) if config.is_file() else MllamaImageProcessor()
        return cls(Tokenizer.from_dir(root), images)

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Token ids -> text (the tokenizer's `decode`)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def with_bos(self, prompt: str) -> str:
        if self.bos_token in prompt:
            return prompt
        lead = 0
        while prompt.startswith(self.image_token, lead):
            lead += len(self.image_token)
        return prompt[:lead] + self.bos_token + prompt[lead:]

    def __call__(self, prompts: str | Sequence[str], images: ImageLike | Sequence[ImageLike] |
                 Sequence[Sequence[ImageLike]] | None = None) -> dict[str, Tensor]:
        """Prompts (each `<|image|>` marks one image) and images (a flat list in placeholder order, or one
        list per prompt) -> input_ids, attention_mask [B, L]; with images also pixel_values, aspect_ratio_ids,
        aspect_ratio_mask and cross_attention_mask: exactly the inputs of `Mllama.prefill` / `avl.generate`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        rows = self.tokenizer.encode_batch([self.with_bos(p) for p in prompts], add_special_tokens=False)
        counts = [r.count(self.image_token_id) for r in rows]
        grouped = self._group_images(counts, images)
        out = self._left_pad(rows)
        if any(grouped):
            tiled = self.image_processor([[im if isinstance(im, Image.Image) else load_image(im) for im in g]
                                          for g in grouped])
            padded_rows = out["input_ids"].tolist()
            out.update(pixel_values=tiled.pixel_values, aspect_ratio_ids=tiled.aspect_ratio_ids,
                       aspect_ratio_mask=tiled.aspect_ratio_mask,
                       cross_attention_mask=cross_attention_mask(padded_rows, self.image_token_id, tiled.num_tiles,
                                                                 self.image_processor.max_image_tiles))
        return out

    def _group_images(self, counts: list[int], images: Any) -> list[list[ImageLike]]:
        if images is None:
            if sum(counts):
                raise ValueError(f"the prompts have {counts} {self.image_token} token(s) but no images were given")
            return [[] for _ in counts]
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = list(images)
        if images and all(isinstance(x, (list, tuple)) for x in images):
            grouped = [list(g) for g in images]
        else:
            if len(images) != sum(counts):
                raise ValueError(f"the prompts have {counts} {self.image_token} token(s) but {len(images)} image(s)")
            starts = [sum(counts[:i]) for i in range(len(counts))]
            grouped = [images[s: s + c] for s, c in zip(starts, counts)]
        if [len(g) for g in grouped] != counts:
            raise ValueError(f"the prompts have {counts} {self.image_token} token(s) but {[len(g) for g in grouped]} "
                             "image(s) per prompt")
        return grouped

    def _left_pad(self, rows: list[list[int]]) -> dict[str, Tensor]:
        length = max(len(r) for r in rows)
        if any(len(r) != length for r in rows) and self.pad_token_id is None:
            raise ValueError("prompts of different lengths need padding but the tokenizer has no pad token")
        input_ids = torch.full((len(rows), length), self.pad_token_id or 0, dtype=torch.int64)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.int64)
        for b, r in enumerate(rows):
            input_ids[b, length - len(r):] = torch.tensor(r, dtype=torch.int64)
            attention_mask[b, length - len(r):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


