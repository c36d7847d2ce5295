"""The one table of model families, keyed by ``config.json``'s ``model_type``.

A :class:`Family` says everything avl knows about one family: how to build its config and model
(``avl.load``), how the weights module renames its checkpoint keys (the model class's ``key_map``),
its chat processor and single-turn chat format (``avl.processing.auto.load_chat_processor``,
``avl generate``), and how lmms-eval prompts it and post-processes its output (``avl eval``).
Adding a family = one entry in :data:`FAMILIES`.

Evaluation prompts. Sources (lmms-eval v0.2.0 model wrappers):

* ``llava`` -- ``lmms_eval/models/llava.py`` (the original LLaVA code, ``conv_template="vicuna_v1"``):
  the context becomes ``"<image>\\n" + text`` and goes through ``conv_vicuna_v1``, i.e.
  ``"<system> USER: <image>\\n{text} ASSISTANT:"`` with LLaVA's system prompt; that is
  :func:`avl.processing.llava15_prompt` with ``system=LLAVA15_SYSTEM_PROMPT``. The decoded text is
  used as is (the wrapper neither strips it nor cuts it at ``until``: that code is commented out).
  Images: the llava-v1.5 checkpoints lmms-eval loads set ``image_aspect_ratio: "pad"``, so images
  are padded to a square with the mean colour before the CLIP preprocessing. Known difference:
  LLaVA's ``tokenizer_image_token`` tokenizes the text after ``<image>`` as a separate chunk, so
  its legacy sentencepiece tokenizer puts a ``"▁"`` token before the ``"\\n"``; avl's processor
  (as llava-hf's) tokenizes the prompt in one piece.
* ``llava_next`` -- the same ``llava`` wrapper and template (its default ``conv_template``), with
  LLaVA-NeXT's anyres processor (``LlavaNextProcessor``).
* ``llava_onevision`` -- ``lmms_eval/models/llava_onevision.py`` (added after v0.2.0; the LLaVA-NeXT repository's code,
  ``conv_template="qwen_1_5"``): the context becomes ``"<image>\\n" + text`` and goes through
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
  stripped (Qwen2.5-VL's wrapper drops ``"\\n\\n"`` from ``until``). Image bounds: the checkpoint's
  preprocessor config for Qwen2-VL (the wrapper's defaults, 3136 / 12845056 pixels, are the hub
  config's); Qwen2.5-VL's wrapper sets min_pixels=256*28*28 and max_pixels=1605632.

Chat formats (``avl generate``): each family's own single-turn template with the images before the
question (LLaVA-1.5's ``USER: <image>\\n...``, LLaVA-NeXT's vicuna or mistral variant by the text
model, the checkpoint's chat template for LLaVA-OneVision, Llama-3.2-Vision's and Qwen2-VL's chat
templates, Qwen-VL's ``Picture k: <img></img>`` list in ChatML); stop ids from the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from avl.models.llava import Llava, LlavaConfig
from avl.models.llava_next import LlavaNext, LlavaNextConfig
from avl.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig
from avl.models.mllama import Mllama, MllamaConfig
from avl.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
from avl.models.qwen_vl import QwenVL, QwenVLConfig
from avl.processing.chat import LLAVA15_SYSTEM_PROMPT, ChatProcessor, llava15_prompt
from avl.processing.llava import LlavaProcessor
from avl.processing.llava_next import LlavaNextProcessor, llava_next_prompt
from avl.processing.llava_onevision import LlavaOnevisionProcessor
from avl.processing.mllama import MllamaProcessor, mllama_prompt
from avl.processing.qwen2_vl import Qwen2VLProcessor, qwen2_vl_prompt
from avl.processing.qwen_vl import QwenVLProcessor, qwen_chat_prompt, qwen_vl_query
from avl.weights import KeyMap

__all__ = ["FAMILIES", "Family", "Processor", "get_family"]


class Processor(Protocol):
    """What the eval runner needs of a processor (``LlavaProcessor`` has it)."""

    tokenizer: Any
    pad_token_id: int | None

    def __call__(self, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, Any]: ...

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class Family:
    """Everything avl knows about one model family.

    Loading: ``config_class.from_dict(config.json)`` builds the config, ``model_class(config)`` the
    model (on the meta device); :attr:`key_map` renames the checkpoint's keys to its parameters.

    Chat: ``chat_processor(directory, config.json dict)`` -> the :class:`ChatProcessor` (processor,
    single-turn prompt with n images, stop ids) of a checkpoint.

    Evaluation, as lmms-eval's wrapper for the family does it: ``lmms_eval_model`` (the model name that
    picks a task's prompt kwargs), ``eval_template`` (task text -> full prompt with one image
    placeholder), ``eval_processor`` (checkpoint directory -> processor with the wrapper's image
    settings), ``strip_output`` / ``cut_at_until`` (what the wrapper does to the decoded text) and
    ``ignored_until`` (``until`` strings it does not cut at); see :meth:`prompt`, :meth:`postprocess`,
    :meth:`load_processor`.
    """

    model_type: str
    config_class: type
    model_class: type[nn.Module]
    chat_processor: Callable[[Path, Mapping[str, Any]], ChatProcessor]
    lmms_eval_model: str
    eval_template: Callable[[str], str]
    eval_processor: Callable[[Path], Processor]
    strip_output: bool = False
    cut_at_until: bool = False
    ignored_until: tuple[str, ...] = ()

    @property
    def key_map(self) -> KeyMap:
        """The model class's checkpoint key map (its rename rules, or a whole KeyMap when it also drops tensors)."""
        key_map = self.model_class.key_map
        return key_map if isinstance(key_map, KeyMap) else KeyMap(key_map)

    def prompt(self, text: str) -> str:
        """The evaluation prompt around a task's text, as lmms-eval's wrapper builds it."""
        return self.eval_template(text)

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
        """The evaluation processor of the checkpoint in `directory`."""
        return self.eval_processor(directory)


# --- chat formats: (checkpoint directory, config.json) -> ChatProcessor --------------------------------

def _ids(*token_ids: int | None) -> tuple[int, ...]:
    return tuple(t for t in token_ids if t is not None)


def _llava_chat(root: Path, config: Mapping[str, Any]) -> ChatProcessor:
    processor = LlavaProcessor.from_dir(root)
    return ChatProcessor(processor, llava15_prompt, _ids(processor.tokenizer.eos_token_id))


def _llava_next_chat(root: Path, config: Mapping[str, Any]) -> ChatProcessor:
    variant = "mistral" if (config.get("text_config") or {}).get("model_type") == "mistral" else "vicuna"
    processor = LlavaNextProcessor.from_dir(root)
    return ChatProcessor(processor, lambda question, n: llava_next_prompt(question, variant, n),
                         _ids(processor.tokenizer.eos_token_id))


def _chatml_stop_ids(tokenizer: Any) -> tuple[int, ...]:
    return _ids(tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>"))


def _llava_onevision_chat(root: Path, config: Mapping[str, Any]) -> ChatProcessor:
    processor = LlavaOnevisionProcessor.from_dir(root)
    return ChatProcessor(processor, processor.prompt, _chatml_stop_ids(processor.tokenizer))


def _mllama_chat(root: Path, config: Mapping[str, Any]) -> ChatProcessor:
    processor = MllamaProcessor.from_dir(root)
    tokenizer = processor.tokenizer
    return ChatProcessor(processor, mllama_prompt, _ids(tokenizer.token_to_id("<|eot_id|>"), tokenizer.eos_token_id))


def _qwen_vl_chat(root: Path, config: Mapping[str, Any]) -> ChatProcessor:
    processor = QwenVLProcessor.from_dir(root)
    tokenizer = processor.tokenizer
    return ChatProcessor(processor, lambda question, n: qwen_chat_prompt(qwen_vl_query(question, n)),
                         (tokenizer.im_end_id, tokenizer.eod_id))


def _qwen2_vl_chat(root: Path, config: Mapping[str, Any]) -> ChatProcessor:
    processor = Qwen2VLProcessor.from_dir(root)
    return ChatProcessor(processor, lambda question, n: qwen2_vl_prompt(question, n_images=n),
                         _chatml_stop_ids(processor.tokenizer))


# --- evaluation prompts and processors (lmms-eval's wrappers, see the module docstring) ----------------

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


def _llava_eval_processor(directory: Path) -> Processor:
    return LlavaProcessor.from_dir(directory, pad_to_square=True)


def _llava_next_eval_processor(directory: Path) -> Processor:
    return LlavaNextProcessor.from_dir(directory)


def _qwen2_5_vl_eval_processor(directory: Path) -> Processor:
    return Qwen2VLProcessor.from_dir(directory, min_pixels=256 * 28 * 28, max_pixels=1605632)


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("llava", LlavaConfig, Llava, _llava_chat, "llava", vicuna_v1, _llava_eval_processor),
    Family("llava_next", LlavaNextConfig, LlavaNext, _llava_next_chat, "llava", vicuna_v1, _llava_next_eval_processor),
    Family("llava_onevision", LlavaOnevisionConfig, LlavaOnevision, _llava_onevision_chat, "llava_onevision",
           qwen_1_5, LlavaOnevisionProcessor.from_dir, strip_output=True),
    Family("mllama", MllamaConfig, Mllama, _mllama_chat, "llama_vision", mllama_prompt, MllamaProcessor.from_dir),
    Family("qwen", QwenVLConfig, QwenVL, _qwen_vl_chat, "qwen_vl", qwen_vl_list_format, QwenVLProcessor.from_dir,
           strip_output=True, cut_at_until=True),
    Family("qwen2_vl", Qwen2VLConfig, Qwen2VL, _qwen2_vl_chat, "qwen2_vl", qwen2_vl_chat, Qwen2VLProcessor.from_dir,
           cut_at_until=True),
    Family("qwen2_5_vl", Qwen2VLConfig, Qwen2VL, _qwen2_vl_chat, "qwen2_5_vl", qwen2_vl_chat,
           _qwen2_5_vl_eval_processor, cut_at_until=True, ignored_until=("\n\n",)),
)}


def get_family(model_type: str | None, source: str | Path | None = None) -> Family:
    """The family registered for `model_type`; raises ValueError naming it, where it came from (`source`,
    e.g. a config.json path) and the supported ones."""
    if model_type not in FAMILIES:
        where = f"{source} has " if source is not None else ""
        raise ValueError(f"{where}model_type={model_type!r}, which avl does not support (no config, model, chat "
                         f"format or evaluation prompts for it); supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]
