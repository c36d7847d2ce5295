"""Per model family: the chat template around a task's text, and how lmms-eval treats the output.

Keyed by ``config.json``'s ``model_type``. Sources (lmms-eval v0.2.0 model wrappers):

* ``llava`` -- ``lmms_eval/models/llava.py`` (the original LLaVA code, ``conv_template="vicuna_v1"``):
  the context becomes ``"<image>\\n" + text`` and goes through ``conv_vicuna_v1``, i.e.
  ``"<system> USER: <image>\\n{text} ASSISTANT:"`` with LLaVA's system prompt; that is
  :func:`avl.processing.llava15_prompt` with ``system=LLAVA15_SYSTEM_PROMPT``. The decoded text is
  used as is (the wrapper neither strips it nor cuts it at ``until``: that code is commented out).
  Images: the llava-v1.5 checkpoints lmms-eval loads set ``image_aspect_ratio: "pad"``, so images
  are padded to a square with the mean colour before the CLIP preprocessing. Known difference:
  LLaVA's ``tokenizer_image_token`` tokenizes the text after ``<image>`` as a separate chunk, so
  its legacy sentencepiece tokenizer puts a ``"▁"`` token before the ``"\n"``; avl's processor
  (as llava-hf's) tokenizes the prompt in one piece.
* ``llava_next`` -- the same ``llava`` wrapper and template (its default ``conv_template``), with
  LLaVA-NeXT's anyres processor (``LlavaNextProcessor``).
* ``llava_onevision`` -- ``lmms_eval/models/llava_onevision.py`` (added after v0.2.0; the LLaVA-NeXT repository's code,
  ``conv_template="qwen_1_5"``): the context becomes ``"<image>\n" + text`` and goes through
  ``conv_qwen`` (ChatML with the system prompt "You are a helpful assistant."), see
  :func:`qwen_1_5`; the decoded text is stripped, not cut at ``until``. Images: the checkpoint's
  anyres_max_9 tiling (``LlavaOnevisionProcessor``); generation stops at ``<|im_end|>``.
* ``mllama`` (Llama-3.2-Vision) -- lmms-eval's ``llama_vision`` wrapper (added after v0.2): one user
  turn, the image first, then the text, through the chat template (:func:`avl.processing.mllama_prompt`).
* ``qwen`` (Qwen-VL) -- ``lmms_eval/models/qwen_vl.py``: no chat template, Qwen's
  ``from_list_format``: ``"Picture 1: <img>{image}</img>\\n{text}"``, the tasks' ``qwen_vl`` prompt
  kwargs (e.g. ``" Answer:"``); the output is stripped and cut at each ``until`` string. avl passes
  the pixels itself, so the ``<img></img>`` span stays empty (``QwenVLProcessor`` fills it with the
  image's 256 positions); generation stops at ``<|endoftext|>``.
* ``qwen2_vl`` / ``qwen2_5_vl`` (Qwen2-VL, Qwen2.5-VL; wrappers added after v0.2) -- ``qwen2_vl.py`` and
  ``qwen2_5_vl.py``: ``"<image>"`` is removed from the text, which goes through the chat template as
  ``[system "You are a helpful assistant.", user: [image, text]]`` with the generation prompt
  (:func:`avl.processing.qwen2_vl_prompt`); the output is cut at each ``until`` string, not
  stripped (Qwen2.5-VL's wrapper drops ``"\n\n"`` from ``until``). Image bounds: the checkpoint's
  preprocessor config for Qwen2-VL (the wrapper's defaults, 3136 / 12845056 pixels, are the hub
  config's); Qwen2.5-VL's wrapper sets min_pixels=256*28*28 and max_pixels=1605632.

Adding a family = one :class:`Family` entry with a template and a processor factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from avl.processing import (
    LLAVA15_SYSTEM_PROMPT,
    LlavaNextProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    MllamaProcessor,
    Qwen2VLProcessor,
    QwenVLProcessor,
    llava15_prompt,
    mllama_prompt,
    qwen2_vl_prompt,
)

__all__ = ["FAMILIES", "Family", "Processor", "get_family"]



class Processor(Protocol):
    """What the runner needs of a processor (``LlavaProcessor`` has it)."""

    tokenizer: Any
    pad_token_id: int | None

    def __call__(self, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, Any]: ...

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class Family:
    """How one model family is prompted and how its output is post-processed.

    ``lmms_eval_model``: the lmms-eval model name that picks a task's prompt kwargs;
    ``template``: task text -> full prompt with one image placeholder;
    ``strip_output`` / ``cut_at_until``: what the lmms-eval wrapper does to the decoded text;
    ``ignored_until``: ``until`` strings the wrapper does not cut at;
    ``processor``: checkpoint directory -> processor.
    """

    model_type: str
    lmms_eval_model: str
    template: Callable[[str], str]
    processor: Callable[[Path], Processor]
    strip_output: bool = False
    cut_at_until: bool = False
    ignored_until: tuple[str, ...] = ()

    def prompt(self, text: str) -> str:
        return self.template(text)

    def postprocess(self, text: str, until: Sequence[str]) -> str:
        """The decoded text as the lmms-eval wrapper hands it to the task."""
        if self.strip_output:
            text = text.strip()
        if self.cut_at_until:
            for term in until:
                if term and term not in self.ignored_until:
                    text = text.split(term)[0]
        return text

    def load_processor(self, directory: Path) -> Processor:
        return self.processor(directory)


def vicuna_v1(text: str) -> str:
    """LLaVA's ``conv_vicuna_v1`` with one image, as lmms-eval's llava wrapper builds it."""
    return llava15_prompt(text, system=LLAVA15_SYSTEM_PROMPT)


def qwen_1_5(text: str) -> str:
    """LLaVA-NeXT's ``conv_qwen`` (``qwen_1_5``) with one image, as lmms-eval's llava_onevision wrapper builds it."""
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n{text}<|im_end|>\n"
            "<|im_start|>assistant\n")


def qwen_vl_list_format(text: str) -> str:
    """Qwen-VL ``tokenizer.from_list_format([{"image": ...}, {"text": text}])``."""
    return f"Picture 1: <img></img>\n{text}"


def qwen2_vl_chat(text: str) -> str:
    """lmms-eval's qwen2_vl / qwen2_5_vl message: the task text without ``"<image>"``, after the image."""
    return qwen2_vl_prompt(text.replace("<image>", ""))


def _qwen2_5_vl_processor(directory: Path) -> Processor:
    return Qwen2VLProcessor.from_dir(directory, min_pixels=256 * 28 * 28, max_pixels=1605632)


def _llava_processor(directory: Path) -> Processor:
    return LlavaProcessor.from_dir(directory, pad_to_square=True)


def _llava_next_processor(directory: Path) -> Processor:
    return LlavaNextProcessor.from_dir(directory)


FAMILIES: dict[str, Family] = {
    "llava": Family("llava", "llava", vicuna_v1, _llava_processor),
    "llava_next": Family("llava_next", "llava", vicuna_v1, _llava_next_processor),
    "llava_onevision": Family("llava_onevision", "llava_onevision", qwen_1_5, LlavaOnevisionProcessor.from_dir,
                              strip_output=True),
    "mllama": Family("mllama", "llama_vision", mllama_prompt, MllamaProcessor.from_dir),
    "qwen": Family("qwen", "qwen_vl", qwen_vl_list_format, QwenVLProcessor.from_dir, strip_output=True,
                   cut_at_until=True),
    "qwen2_vl": Family("qwen2_vl", "qwen2_vl", qwen2_vl_chat, Qwen2VLProcessor.from_dir, cut_at_until=True),
    "qwen2_5_vl": Family("qwen2_5_vl", "qwen2_5_vl", qwen2_vl_chat, _qwen2_5_vl_processor, cut_at_until=True,
                         ignored_until=("\n\n",)),
}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"no evaluation prompts for model_type {model_type!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
