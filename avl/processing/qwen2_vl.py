"""Qwen2-VL / Qwen2.5-VL input processing: native-resolution image patches, chat template, placeholders.

Facts from transformers' `Qwen2VLImageProcessorPil` (the slow processor, `use_fast=False`) and
`Qwen2VLProcessor` (Qwen2.5-VL uses both unchanged):

- `smart_resize`: each side rounded to a multiple of `factor = patch_size * merge_size` (28);
  if the area then exceeds `max_pixels` both sides are scaled by sqrt(h * w / max_pixels) and
  floored to multiples, if it is below `min_pixels` scaled up and ceiled; aspect ratios above 200
  are refused;
- RGB conversion (transparency onto white), PIL resize of the uint8 image (bicubic), rescale in
  float64 then float32, `(x - mean) / std` in float32 (OpenAI CLIP statistics);
- patch rows: the image [C, H, W] is cut into P x P patches, ordered by merge block (blocks
  row-major, the merge x merge patches of a block row-major), each row C x T x P x P with the
  image repeated over the T = temporal_patch_size frames -> `pixel_values [sum(h*w), C*T*P*P]`,
  `image_grid_thw [images, 3]` = (1, H / P, W / P);
- each `<|image_pad|>` in the text becomes t * h * w / merge**2 copies (one per merged feature);
  `mm_token_type_ids` marks them 1 (text 0);
- chat: the checkpoint's own Jinja `chat_template` (ChatML; an image content part renders as
  `<|vision_start|><|image_pad|><|vision_end|>`), rendered like transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from avl.processing.files import read_json_object, read_optional_json, read_preprocessor_config
from avl.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageLike, load_image, to_rgb
from avl.processing.llava import LlavaProcessor
from avl.processing.tokenizer import Tokenizer

IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
MAX_ASPECT_RATIO = 200
_PIL_RESAMPLE = {int(r): r for r in Image.Resampling}


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) after Qwen2-VL's resize rule: multiples of `factor`, area in
    [min_pixels, max_pixels] where possible, aspect ratio kept as closely as possible."""
    if min(height, width) < 1:
        raise ValueError(f"image size {height}x{width} (height x width) has an empty side")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image size {height}x{width} (height x width) has an aspect ratio above {MAX_ASPECT_RATIO}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass
class Qwen2VLImageProcessor:
    """Qwen2-VL image preprocessing (pixel-identical to transformers' `Qwen2VLImageProcessorPil`).

    Attributes:
        min_pixels, max_pixels: area bounds of the resized image (the hub's `min_pixels` /
            `max_pixels`, or `size["shortest_edge"]` / `size["longest_edge"]`).
        patch_size, temporal_patch_size, merge_size: the vision tower's geometry (14, 2, 2).
        resample: PIL resampling code (3 = bicubic).
        rescale_factor, image_mean, image_std: the float steps.
        do_resize, do_rescale, do_normalize, do_convert_rgb: step switches.
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} is above max_pixels={self.max_pixels}")
        if int(self.resample) not in _PIL_RESAMPLE:
            raise ValueError(f"resample={self.resample!r} is not a PIL resampling code {sorted(_PIL_RESAMPLE)}")
        self.resample = int(self.resample)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ValueError(f"image_mean and image_std need 3 values (RGB, std non-zero), got {self.image_mean} "
                             f"and {self.image_std}")

    @classmethod
    def from_preprocessor_config(cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]
                                 ) -> Qwen2VLImageProcessor:
        """From a `preprocessor_config.json` (a file, its directory, or the parsed dict). As in
        transformers, `min_pixels` / `max_pixels` win over `size`'s shortest / longest edge."""
        raw = read_preprocessor_config(path_or_dict)
        size = raw.get("size") or {}
        kwargs: dict[str, Any] = {}
        for ours, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = raw.get(ours, size.get(size_key))
            if value is not None:
                kwargs[ours] = int(value)
        for name in ("patch_size", "temporal_patch_size", "merge_size", "resample", "rescale_factor", "image_mean",
                     "image_std", "do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if raw.get(name) is not None:
                kwargs[name] = raw[name]
        return cls(**kwargs)

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merge block of patches."""
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of that size is resized to."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """`<|image_pad|>` tokens (merged features) of an image of that size."""
        h, w = self.resized_size(height, width) if self.do_resize else (height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        """Images (PIL or paths) -> `pixel_values [sum(h*w), C*T*P*P]` float32, `image_grid_thw [N, 3]` int64."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        if not images:
            raise ValueError("no images given")
        rows, grids = zip(*(self.preprocess_one(im) for im in images))
        return {"pixel_values": torch.cat(rows), "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}

    def preprocess_one(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One PIL image -> its patch rows [h*w, C*T*P*P] float32 and its grid (1, h, w)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r} and do_convert_rgb=False; pass RGB images")
        if self.do_resize:
            height, width = self.resized_size(image.height, image.width)
            image = image.resize((width, height), resample=_PIL_RESAMPLE[self.resample])
        elif image.height % self.factor or image.width % self.factor:
            raise ValueError(f"with do_resize=False the image sides must be multiples of {self.factor}, got "
                             f"{image.height}x{image.width}")
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
        x = pixels.permute(2, 0, 1).to(torch.float32)  # [3, H, W]
        if self.do_rescale:
            x = (x.to(torch.float64) * self.rescale_factor).to(torch.float32)  # NumPy's float64 product, one cast
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return self.patchify(x), (1, image.height // self.patch_size, image.width // self.patch_size)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[C, H, W] -> patch rows [(H/P) * (W/P), C*T*P*P] in merge-block order."""
        c, height, width = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        blocks = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], t, p, p)  # the image repeated over T frames
        return frames.reshape(gh * gw, c * t * p * p).contiguous()



def read_chat_template(root: Path) -> str | None:
    """The checkpoint's chat template: `chat_template.jinja` (transformers 5), `chat_template.json`
    (the hub's Qwen2-VL layout), or `tokenizer_config.json`'s `chat_template`; None if none."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = read_optional_json(root / name).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                         **kwargs: Any) -> str:
    """Render a Jinja chat template the way transformers' `apply_chat_template` does (sandboxed,
    `trim_blocks`, `lstrip_blocks`, loop controls, its `tojson` and `raise_exception`)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **kwargs)


QWEN2_VL_SYSTEM_PROMPT = "You are a helpful assistant."


def qwen2_vl_prompt(question: str, system: str = QWEN2_VL_SYSTEM_PROMPT, n_images: int = 1) -> str:
    """One user turn, the images before the question, as the chat template of Qwen2-VL-*-Instruct and
    Qwen2.5-VL-*-Instruct renders `[system, user: [image] * n_images + [text]]` with the generation prompt
    (one `<|vision_start|><|image_pad|><|vision_end|>` block per image, nothing between them)."""
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0:
        raise ValueError(f"n_images={n_images!r} is invalid; allowed: an int >= 0")
    images = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * n_images
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{images}{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


class Qwen2VLProcessor:
    """Tokenizer + image processor + chat template of a Qwen2-VL / Qwen2.5-VL checkpoint.

    Args:
        tokenizer: the checkpoint's Qwen2 tokenizer (`tokenizer.json`); `<|image_pad|>` must be one id.
        image_processor: the native-resolution preprocessing.
        chat_template: the checkpoint's Jinja template (None: `apply_chat_template` is unavailable).
        image_token_id, pad_token_id: default the tokenizer's ids of `<|image_pad|>` and its pad token.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: Qwen2VLImageProcessor, *,
                 chat_template: str | None = None, image_token_id: int | None = None,
                 pad_token_id: int | None = None) -> None:
        # the text side (placeholder checks, image matching, left padding) is LLaVA-1.5's; its
        # fixed count is unused, every image has its own
        self._text = LlavaProcessor(tokenizer, image_processor, num_image_tokens=1, image_token_id=image_token_id,
                                    image_token=IMAGE_PAD, pad_token_id=pad_token_id)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token_id: int = self._text.image_token_id
        self.pad_token_id: int | None = self._text.pad_token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], *, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> Qwen2VLProcessor:
        """Load from a checkpoint directory: tokenizer files, `preprocessor_config.json` (transformers'
        defaults if absent), the chat template; `config.json`'s `image_token_id` must match the tokenizer.
        `min_pixels` / `max_pixels` override the preprocessor config's (as transformers'
        `AutoProcessor.from_pretrained(..., min_pixels=..., max_pixels=...)`)."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {str(root)!r}")
        tokenizer = Tokenizer.from_dir(root)
        preprocessor = root / "preprocessor_config.json"
        image_processor = (Qwen2VLImageProcessor.from_preprocessor_config(preprocessor) if preprocessor.is_file()
                           else Qwen2VLImageProcessor())
        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = replace(image_processor, **bounds)
        image_token_id = tokenizer.token_to_id(IMAGE_PAD)
        config = read_json_object(root / "config.json") if (root / "config.json").is_file() else {}
        if config.get("image_token_id") is not None and config["image_token_id"] != image_token_id:
            raise ValueError(f"config.json image_token_id={config['image_token_id']} but the tokenizer's {IMAGE_PAD!r} "
                             f"id is {image_token_id} in {str(root)!r}")
        return cls(tokenizer, image_processor, chat_template=read_chat_template(root), image_token_id=image_token_id)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text of a conversation (transformers' message format: `{"role", "content"}`,
        content a string or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` parts)."""
        if self.chat_template is None:
            raise ValueError("this processor has no chat_template (none in the checkpoint directory)")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **kwargs)

    def __call__(self, prompts: str | Sequence[str],
                 images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None
                 ) -> dict[str, torch.Tensor]:
        """Tokenize, preprocess images, expand each `<|image_pad|>` to its image's token count, left-pad.

        Returns `input_ids`, `attention_mask`, `mm_token_type_ids` [B, L] int64 and, with images,
        `pixel_values [patches, C*T*P*P]` float32 and `image_grid_thw [images, 3]` int64.
        """
        token_ids, pil_images = self._text.tokenize(prompts, images)
        vision: dict[str, torch.Tensor] = {}
        lengths: list[int] = []
        if pil_images:
            vision = self.image_processor(pil_images)
            lengths = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        text = self._text.pack(token_ids, lengths)
        text["mm_token_type_ids"] = (text["input_ids"] == self.image_token_id).long() * text["attention_mask"]
        return {**text, **vision}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids (special tokens skipped by default)."""
        return self._text.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each row of a batch."""
        return self._text.batch_decode(ids, skip_special_tokens=skip_special_tokens)


__all__ = ["QWEN2_VL_SYSTEM_PROMPT", "Qwen2VLImageProcessor", "Qwen2VLProcessor", "qwen2_vl_prompt",
           "read_chat_template", "render_chat_template", "smart_resize"]
