"""LLaVA-1.5 prompt format.

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
