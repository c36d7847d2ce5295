"""Per-family input processing: images, tokenizers, chat templates (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
Qwen-VL, Qwen2-VL / Qwen2.5-VL, Llama-3.2-Vision)."""

from avl.processing.anyres import LlavaNextImageProcessor
from avl.processing.chat import LLAVA15_SYSTEM_PROMPT, ChatProcessor, llava15_prompt
from avl.processing.chat_template import read_chat_template, render_chat_template
from avl.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipImageProcessor, load_image, to_8bit, to_rgb
from avl.processing.llava import LlavaProcessor
from avl.processing.llava_next import LlavaNextProcessor, llava_next_prompt
from avl.processing.llava_onevision import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, onevision_prompt
from avl.processing.mllama import MllamaImageProcessor, MllamaProcessor, mllama_chat_prompt, mllama_prompt
from avl.processing.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor, qwen2_vl_prompt
from avl.processing.qwen_vl import (
    QwenTokenizer,
    QwenVLImageProcessor,
    QwenVLProcessor,
    qwen_chat_prompt,
    qwen_vl_query,
)
from avl.processing.streaming import TextStreamer
from avl.processing.tokenizer import Tokenizer

__all__ = [
    "LLAVA15_SYSTEM_PROMPT",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ChatProcessor",
    "ClipImageProcessor",
    "LlavaNextImageProcessor",
    "LlavaNextProcessor",
    "LlavaOnevisionImageProcessor",
    "LlavaOnevisionProcessor",
    "LlavaProcessor",
    "MllamaImageProcessor",
    "MllamaProcessor",
    "Qwen2VLImageProcessor",
    "Qwen2VLProcessor",
    "QwenTokenizer",
    "QwenVLImageProcessor",
    "QwenVLProcessor",
    "TextStreamer",
    "Tokenizer",
    "llava15_prompt",
    "llava_next_prompt",
    "load_image",
    "mllama_chat_prompt",
    "mllama_prompt",
    "onevision_prompt",
    "qwen2_vl_prompt",
    "qwen_chat_prompt",
    "qwen_vl_query",
    "read_chat_template",
    "render_chat_template",
    "to_8bit",
    "to_rgb",
]
