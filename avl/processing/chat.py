"""LLaVA-1.5 prompt format, and `ChatProcessor`: a family's processor with its single-turn chat format.

Source: the chat template shipped with the llava-hf checkpoints (`chat_template.json` of
llava-hf/llava-1.5-7b-hf, also the prompt in transformers' `LlavaForConditionalGeneration`
docstring): each turn is `ROLE.upper() + ": "`, then one `"<image>\\n"` per image of the turn,
then each text part followed by a space; the generation prompt is `"ASSISTANT:"`. One user turn
with one image therefore reads

    "USER: <image>\\n{question} ASSISTANT:"

The original LLaVA-1.5 code (`conv_vicuna_v1`, "llava_v1" mode) puts the system prompt
`LLAVA15_SYSTEM_PROMPT` and a space in front of this; pass `system=LLAVA15_SYSTEM_PROMPT` for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from avl.processing.image import ImageLike

IMAGE_TOKEN = "<image>"

LLAVA15_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def llava15_prompt(question: str, n_images: int = 1, *, system: str | None = None) -> str:
    """The LLaVA-1.5 single-turn prompt for `question` with `n_images` image placeholders.

    `llava15_prompt("What is this?")` -> `"USER: <image>\\nWhat is this? ASSISTANT:"`.
    With `system`, the prompt starts with `system + " "` (original LLaVA format).
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0:
        raise ValueError(f"n_images must be an int >= 0, got {n_images!r}")
    prefix = f"{system} " if system else ""
    text = f"{question} " if question else ""  # the template adds no text part for an empty question
    return f"{prefix}USER: {(IMAGE_TOKEN + chr(10)) * n_images}{text}ASSISTANT:"


@dataclass(frozen=True)
class ChatProcessor:
    """A family's processor with its chat format: one question per sample, with one or more images.

    `prompt(question, n_images)` is the family's single-turn prompt with `n_images` image slots before
    the question; `stop_token_ids` end a generated answer. `__call__` returns the model inputs by
    transformers' names (`input_ids`, `attention_mask`, `pixel_values`, and e.g. `image_sizes` for
    LLaVA-NeXT), ready for `avl.generate(model, **inputs)`. `avl.families` builds one per checkpoint
    (`avl.processing.auto.load_chat_processor`).
    """

    processor: Any
    prompt: Callable[[str, int], str]
    stop_token_ids: tuple[int, ...]

    def __call__(self, questions: Sequence[str],
                 images: Sequence[ImageLike | Sequence[ImageLike]]) -> dict[str, torch.Tensor]:
        """`images[i]` is question i's image, or a list of its images (in the order they are shown)."""
        groups = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        if len(groups) != len(questions):
            raise ValueError(f"got {len(questions)} question(s) but {len(groups)} image entries; allowed: one "
                             "image, or one list of images, per question")
        return self.processor([self.prompt(q, len(g)) for q, g in zip(questions, groups)], groups)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of generated ids, special tokens dropped."""
        return self.processor.decode(ids, skip_special_tokens=True)
