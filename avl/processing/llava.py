"""LLaVA-1.5 processor: prompts + images -> `input_ids`, `attention_mask`, `pixel_values`.

Each `<image>` placeholder token is expanded to `num_image_tokens` copies of the image-token id
(one per vision feature position: (crop / patch)^2 = 576 for 336 / 14 with the CLS feature
dropped, the "default" feature-select strategy). This equals transformers' `LlavaProcessor`,
which expands the placeholder in the text before tokenizing: `<image>` is a special added token,
so both give the same ids. Batches are left-padded (the decoder generates at the right end).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from avl.processing.chat import IMAGE_TOKEN
from avl.processing.files import read_optional_json
from avl.processing.image import ClipImageProcessor, ImageLike, load_image
from avl.processing.tokenizer import Tokenizer



class LlavaProcessor:
    """Tokenizer + CLIP image processor for LLaVA-1.5.

    Args:
        tokenizer: the checkpoint's tokenizer; `image_token` must encode to the single id
            `image_token_id`.
        image_processor: the CLIP preprocessing.
        num_image_tokens: ids per image after expansion (576 for LLaVA-1.5 at 336 px).
        image_token_id: id of the placeholder; default: the tokenizer's id of `image_token`.
        image_token: the placeholder text (`"<image>"`).
        pad_token_id: id used for left padding; default: the tokenizer's pad id.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ClipImageProcessor,
        *,
        num_image_tokens: int = 576,
        image_token_id: int | None = None,
        image_token: str = IMAGE_TOKEN,
        pad_token_id: int | None = None,
    ) -> None:
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be an int >= 1, got {num_image_tokens!r}")
        encoded = tokenizer.encode(image_token, add_special_tokens=False)
        if image_token_id is None:
            image_token_id = tokenizer.token_to_id(image_token)
            if image_token_id is None:
                raise ValueError(f"the tokenizer has no {image_token!r} token; pass image_token_id or add the token")
        if encoded != [image_token_id]:
            raise ValueError(
                f"{image_token!r} must encode to the single id [{image_token_id}] (image_token_id), "
                f"but the tokenizer gives {encoded}"
            )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike[str],
        num_image_tokens: int | None = None,
        image_token_id: int | None = None,
        *,
        pad_to_square: bool | None = None,
    ) -> LlavaProcessor:
        """Load a processor from a checkpoint directory.

        Reads the tokenizer files and `preprocessor_config.json` (LLaVA-1.5 CLIP defaults if absent).
        `num_image_tokens`, if not given, comes from `processor_config.json` (`patch_size`,
        `vision_feature_select_strategy`, `num_additional_image_tokens`) or else `config.json`
        (`vision_config.patch_size`, `vision_feature_select_strategy`; CLIP's CLS token counts as
        the one additional token). `image_token_id`, if not given, is the tokenizer's id of
        `<image>`, checked against `config.json`'s `image_token_index` / `image_token_id`.
        `pad_to_square` overrides the preprocessor config (True = original LLaVA-1.5 padding).
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {str(root)!r}")
        tokenizer = Tokenizer.from_dir(root)
        if (root / "preprocessor_config.json").is_file():
            image_processor = ClipImageProcessor.from_preprocessor_config(root / "preprocessor_config.json")
        else:
            image_processor = ClipImageProcessor()
        if pad_to_square is not None:
            image_processor.pad_to_square = pad_to_square
        config = read_optional_json(root / "config.json")
        if num_image_tokens is None:
            num_image_tokens = _num_image_tokens_from_configs(root, image_processor, config)
        if image_token_id is None:
            image_token_id = image_token_id_of(tokenizer, config, root)
        return cls(tokenizer, image_processor, num_image_tokens=num_image_tokens, image_token_id=image_token_id)

    def __call__(
        self,
        prompts: str | Sequence[str],
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize prompts, expand image placeholders, preprocess images, left-pad.

        Args:
            prompts: one prompt or a batch; each `<image>` marks where one image goes.
            images: None; a flat list (one image per placeholder, in order across the batch); or
                one list per prompt. Items are PIL images or file paths.

        Returns:
            `input_ids` [B, L] int64 (left-padded with the pad id), `attention_mask` [B, L] int64
            (0 on pads), and, when images are given, `pixel_values` [N_images, 3, H, W] float32.

        Raises:
            ValueError: the number of `<image>` placeholders differs from the number of images.
        """
        token_ids, pil_images = self.tokenize(prompts, images)
        out = self.pack(token_ids, [self.num_image_tokens] * len(pil_images))
        if pil_images:
            out["pixel_values"] = self.image_processor(pil_images)
        return out

    def tokenize(
        self,
        prompts: str | Sequence[str],
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None,
    ) -> tuple[list[list[int]], list[Image.Image]]:
        """Token ids of each prompt (placeholders not yet expanded) and its images, opened, in
        placeholder order across the batch. Raises if placeholders and images do not match."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}")
        token_ids = self.tokenizer.encode_batch(prompts, add_special_tokens=True)
        flat_images = self._match_images([ids.count(self.image_token_id) for ids in token_ids], images)
        return token_ids, [im if isinstance(im, Image.Image) else load_image(im) for im in flat_images]

    def pack(self, token_ids: list[list[int]], lengths: list[int]) -> dict[str, torch.Tensor]:
        """Replace the k-th placeholder of the batch by `lengths[k]` image-token ids, then left-pad:
        `input_ids`, `attention_mask` [B, L]."""
        counts = iter(lengths)
        rows = []
        for ids in token_ids:
            row: list[int] = []
            for t in ids:
                row.extend([t] * next(counts) if t == self.image_token_id else [t])
            rows.append(row)
        return self._left_pad(rows)

    def _match_images(self, counts: list[int], images: Any) -> list[ImageLike]:
        """Check placeholders against images; return the images in placeholder order."""
        total = sum(counts)
        if images is None:
            if total:
                raise ValueError(
                    f"the prompts contain {total} {self.image_token} placeholder(s) "
                    f"(per prompt: {counts}) but no images were given"
                )
            return []
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = list(images)
        nested = len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images)
        if nested:
            if len(images) != len(counts):
                raise ValueError(f"got {len(images)} image lists for {len(counts)} prompts")
            for i, (n_placeholders, group) in enumerate(zip(counts, images)):
                if n_placeholders != len(group):
                    raise ValueError(
                        f"prompt {i} has {n_placeholders} {self.image_token} placeholder(s) "
                        f"but {len(group)} image(s) were given for it"
                    )
            return [im for group in images for im in group]
        if total != len(images):
            raise ValueError(
                f"the prompts contain {total} {self.image_token} placeholder(s) (per prompt: {counts}) "
                f"but {len(images)} image(s) were given"
            )
        return images

    def _left_pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(r) for r in rows)
        if any(len(r) != length for r in rows) and self.pad_token_id is None:
            raise ValueError("prompts of different lengths need padding but the tokenizer has no pad token")
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for b, r in enumerate(rows):
            if r:
                input_ids[b, length - len(r) :] = torch.tensor(r, dtype=torch.int64)
                attention_mask[b, length - len(r) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids (image and pad tokens are special, so skipped by default)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each row of a batch."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]


def image_token_id_of(tokenizer: Tokenizer, config: dict[str, Any], root: Path) -> int | None:
    """The tokenizer's `<image>` id, checked against `config.json`'s `image_token_index` /
    `image_token_id`; the config's id when the tokenizer has no `<image>` token."""
    config_image_id = config.get("image_token_index", config.get("image_token_id"))
    image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_token_id is None:
        return config_image_id
    if config_image_id is not None and int(config_image_id) != image_token_id:
        raise ValueError(
            f"config.json image_token_index={config_image_id} but the tokenizer's {IMAGE_TOKEN!r} "
            f"id is {image_token_id} in {str(root)!r}"
        )
    return image_token_id


def _num_image_tokens_from_configs(root: Path, image_processor: ClipImageProcessor, config: dict[str, Any]) -> int:
    """(crop_h // patch) * (crop_w // patch) + additional - (1 if strategy == "default")."""
    proc_cfg = read_optional_json(root / "processor_config.json")
    if proc_cfg.get("patch_size"):
        patch = int(proc_cfg["patch_size"])
        strategy = proc_cfg.get("vision_feature_select_strategy") or config.get("vision_feature_select_strategy")
        additional = int(proc_cfg.get("num_additional_image_tokens", 0))
        source = "processor_config.json"
    elif isinstance(config.get("vision_config"), dict) and config["vision_config"].get("patch_size"):
        patch = int(config["vision_config"]["patch_size"])
        strategy = config.get("vision_feature_select_strategy", "default")
        additional = 1  # CLIP's CLS feature
        source = "config.json"
    else:
        raise ValueError(
            f"cannot infer num_image_tokens in {str(root)!r}: no patch_size in processor_config.json or "
            "config.json vision_config; pass num_image_tokens"
        )
    if strategy not in (None, "default", "full"):
        raise ValueError(f"unknown vision_feature_select_strategy {strategy!r} in {source}")
    crop_h, crop_w = image_processor.output_size
    n = (crop_h // patch) * (crop_w // patch) + additional - (1 if strategy == "default" else 0)
    if n < 1:
        raise ValueError(f"inferred num_image_tokens={n} from {source} (patch_size={patch}, crop={crop_h}x{crop_w})")
    return n
