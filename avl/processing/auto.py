"""`load_chat_processor`: the right processor and single-turn chat prompt for a checkpoint's family."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avl.processing.chat import llava15_prompt
from avl.processing.image import ImageLike
from avl.processing.llava import LlavaProcessor
from avl.processing.llava_next import LlavaNextProcessor, llava_next_prompt
from avl.processing.llava_onevision import LlavaOnevisionProcessor
from avl.processing.mllama import MllamaProcessor, mllama_prompt
from avl.processing.qwen2_vl import Qwen2VLProcessor, qwen2_vl_prompt
from avl.processing.qwen_vl import QwenVLProcessor, qwen_chat_prompt, qwen_vl_query
from avl.weights import read_config


@dataclass(frozen=True)
class ChatProcessor:
    """A family's processor with its chat format: one question per sample, one image each.

    `__call__` returns the model inputs by transformers' names (`input_ids`, `attention_mask`,
    `pixel_values`, and e.g. `image_sizes` for LLaVA-NeXT), ready for `avl.generate(model, **inputs)`.
    """

    processor: Any
    prompt: Callable[[str], str]
    stop_token_ids: tuple[int, ...]

    def __call__(self, questions: Sequence[str], images: Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        return self.processor([self.prompt(q) for q in questions], list(images))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.processor.decode(ids, skip_special_tokens=True)


def load_chat_processor(directory: str | os.PathLike[str]) -> ChatProcessor:
    """The chat processor of the checkpoint in `directory`, by its `config.json` `model_type`."""
    root = Path(directory)
    config = read_config(root)
    model_type = config.get("model_type")
    if model_type == "llava":
        processor = LlavaProcessor.from_dir(root)
        return ChatProcessor(processor, llava15_prompt, _ids(processor.tokenizer.eos_token_id))
    if model_type == "llava_next":
        variant = "mistral" if (config.get("text_config") or {}).get("model_type") == "mistral" else "vicuna"
        processor = LlavaNextProcessor.from_dir(root)
        return ChatProcessor(processor, lambda q: llava_next_prompt(q, variant), _ids(processor.tokenizer.eos_token_id))
    if model_type == "llava_onevision":
        processor = LlavaOnevisionProcessor.from_dir(root)
        tokenizer = processor.tokenizer
        return ChatProcessor(processor, processor.prompt,
                             _ids(tokenizer.token_to_id("<|im_end|>")) + _ids(tokenizer.token_to_id("<|endoftext|>")))
    if model_type == "mllama":
        processor = MllamaProcessor.from_dir(root)
        tokenizer = processor.tokenizer
        return ChatProcessor(processor, mllama_prompt,
                             _ids(tokenizer.token_to_id("<|eot_id|>")) + _ids(tokenizer.eos_token_id))
    if model_type == "qwen":
        processor = QwenVLProcessor.from_dir(root)
        tokenizer = processor.tokenizer
        return ChatProcessor(processor, lambda q: qwen_chat_prompt(qwen_vl_query(q)),
                             (tokenizer.im_end_id, tokenizer.eod_id))
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        processor = Qwen2VLProcessor.from_dir(root)
        tokenizer = processor.tokenizer
        return ChatProcessor(processor, qwen2_vl_prompt,
                             _ids(tokenizer.token_to_id("<|im_end|>")) + _ids(tokenizer.token_to_id("<|endoftext|>")))
    raise ValueError(f"no chat processor for model_type={model_type!r} in {root / 'config.json'}; "
                     "supported: ['llava', 'llava_next', 'llava_onevision', 'mllama', 'qwen', 'qwen2_5_vl', 'qwen2_vl']")


def _ids(token_id: int | None) -> tuple[int, ...]:
    return () if token_id is None else (token_id,)
