"""LLaVA-NeXT processor and prompts: prompts + images -> `input_ids`, `attention_mask`,
`pixel_values` [N, tiles, 3, 336, 336], `image_sizes` [N, 2].

Each `<image>` placeholder is expanded to the token count of ITS image, which depends on the
image's size (`avl.processing.anyres.num_image_tokens`); transformers' `LlavaNextProcessor`
gives the same ids (it expands the placeholder in the text before tokenizing; `<image>` is a
special added token, so both tokenize alike). Batches are left-padded.

Prompt formats (`llava_next_prompt`), from the chat templates of the llava-hf checkpoints:

- vicuna (llava-v1.6-vicuna-7b-hf, -13b-hf): LLaVA-1.5's template, `"USER: <image>\\n{q} ASSISTANT:"`;
  a system message is rendered as its text and a space in front (the model cards prompt with
  `LLAVA15_SYSTEM_PROMPT`, the original "llava_v1" conversation);
- mistral (llava-v1.6-mistral-7b-hf): `"[INST] <image>\\n{q} [/INST]"`; the template has no
  system role and no generation prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from avl.processing.anyres import LlavaNextImageProcessor, Size, check_image_size
from avl.processing.chat import IMAGE_TOKEN, llava15_prompt
from avl.processing.files import read_optional_json
from avl.processing.image import ImageLike
from avl.processing.llava import LlavaProcessor, image_token_id_of
from avl.processing.tokenizer import Tokenizer

PROMPT_VARIANTS = ("vicuna", "mistral")


def llava_next_prompt(question: str, variant: str = "vicuna", n_images: int = 1, *, system: str | None = None) -> str:
    """The single-turn LLaVA-1.6 prompt of `variant` ("vicuna" or "mistral") for `question`.

    `llava_next_prompt("What is this?", "mistral")` -> `"[INST] <image>\\nWhat is this? [/INST]"`;
    `llava_next_prompt("What is this?")` -> `"USER: <image>\\nWhat is this? ASSISTANT:"`, with
    `system` in front (`system + " "`) when given.
    """
    if variant not in PROMPT_VARIANTS:
        raise ValueError(f"variant={variant!r} is not a LLaVA-1.6 prompt format; allowed: {list(PROMPT_VARIANTS)}")
    if variant == "vicuna":
        return llava15_prompt(question, n_images, system=system)
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0:
        raise ValueError(f"n_images must be an int >= 0, got {n_images!r}")
    if system is not None:
        raise ValueError("the llava-v1.6-mistral chat template has no system role; put the instruction in the question")
    return f"[INST] {(IMAGE_TOKEN + chr(10)) * n_images}{question} [/INST]"


class LlavaNextProcessor:
    """Tokenizer + anyres image processor for LLaVA-NeXT.

    Args:
        tokenizer: the checkpoint's tokenizer; `image_token` must encode to one id.
        image_processor: the anyres preprocessing.
        patch_size: the vision tower's patch size (14).
        image_token_id, image_token, pad_token_id: as in `LlavaProcessor`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: LlavaNextImageProcessor,
        *,
        patch_size: int = 14,
        image_token_id: int | None = None,
        image_token: str = IMAGE_TOKEN,
        pad_token_id: int | None = None,
    ) -> None:
        tile = image_processor.tile
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1 or tile % patch_size:
            raise ValueError(f"patch_size={patch_size!r} must be an int >= 1 that divides the tile size {tile}")
        # the text side (placeholder checks, image matching, left padding) is LLaVA-1.5's; its fixed
        # count is the base tile's, unused here
        self._text = LlavaProcessor(
            tokenizer, image_processor.tile_processor, num_image_tokens=(tile // patch_size) ** 2,
            image_token_id=image_token_id, image_token=image_token, pad_token_id=pad_token_id,
        )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.patch_size = patch_size
        self.image_token = image_token
        self.image_token_id: int = self._text.image_token_id
        self.pad_token_id: int | None = self._text.pad_token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], patch_size: int | None = None,
                 image_token_id: int | None = None) -> LlavaNextProcessor:
        """Load from a checkpoint directory: tokenizer files, `preprocessor_config.json` (LLaVA-1.6
        defaults if absent), the patch size from `processor_config.json` or else `config.json`'s
        `vision_config`, the image token id from the tokenizer, checked against `config.json`.

        The count per image always drops CLS (the only strategy LLaVA-NeXT supports), whatever
        `num_additional_image_tokens` says.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {str(root)!r}")
        tokenizer = Tokenizer.from_dir(root)
        if (root / "preprocessor_config.json").is_file():
            image_processor = LlavaNextImageProcessor.from_preprocessor_config(root / "preprocessor_config.json")
        else:
            image_processor = LlavaNextImageProcessor()
        config = read_optional_json(root / "config.json")
        processor_config = read_optional_json(root / "processor_config.json")
        for source, cfg in (("processor_config.json", processor_config), ("config.json", config)):
            if cfg.get("vision_feature_select_strategy") not in (None, "default"):
                raise ValueError(
                    f"vision_feature_select_strategy={cfg['vision_feature_select_strategy']!r} in {source} is not "
                    "supported by LLaVA-NeXT; allowed: ['default']"
                )
        if patch_size is None:
            patch_size = processor_config.get("patch_size") or (config.get("vision_config") or {}).get("patch_size")
        if patch_size is None:
            raise ValueError(
                f"cannot infer patch_size in {str(root)!r}: no patch_size in processor_config.json or config.json "
                "vision_config; pass patch_size"
            )
        if image_token_id is None:
            image_token_id = image_token_id_of(tokenizer, config, root)
        return cls(tokenizer, image_processor, patch_size=int(patch_size), image_token_id=image_token_id)

    def num_image_tokens(self, image_size: Size) -> int:
        """Image tokens an image of (height, width) `image_size` expands its placeholder to."""
        return self.image_processor.num_image_tokens(check_image_size(image_size), self.patch_size)

    def __call__(
        self,
        prompts: str | Sequence[str],
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize, preprocess images, expand each placeholder to its image's count, left-pad.

        Args:
            prompts: one prompt or a batch; each `<image>` marks where one image goes.
            images: None; a flat list (one image per placeholder, in order across the batch); or
                one list per prompt. Items are PIL images or file paths.

        Returns:
            `input_ids` [B, L] and `attention_mask` [B, L] int64 (left-padded), and with images
            `pixel_values` [N, max_tiles, 3, tile, tile] float32 and `image_sizes` [N, 2] int64.

        Raises:
            ValueError: the number of `<image>` placeholders differs from the number of images.
        """
        token_ids, pil_images = self._text.tokenize(prompts, images)
        vision: dict[str, torch.Tensor] = {}
        lengths: list[int] = []
        if pil_images:
            vision = self.image_processor(pil_images)
            lengths = [self.num_image_tokens(size) for size in vision["image_sizes"].tolist()]
        return {**self._text.pack(token_ids, lengths), **vision}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids (image and pad tokens are special, so skipped by default)."""
        return self._text.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each row of a batch."""
        return self._text.batch_decode(ids, skip_special_tokens=skip_special_tokens)


__all__ = ["PROMPT_VARIANTS", "LlavaNextProcessor", "llava_next_prompt"]
