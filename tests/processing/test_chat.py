"""LLaVA-1.5 prompt format against llava-hf's chat template rendered by transformers."""

from __future__ import annotations

import pytest

from avl.processing import LLAVA15_SYSTEM_PROMPT, llava15_prompt

# chat_template.json of llava-hf/llava-1.5-7b-hf (the processor's chat template)
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_matches_transformers_docstring_example():
    # transformers/models/llava/modeling_llava.py, LlavaForConditionalGeneration.forward example
    assert (
        llava15_prompt("What's the content of the image?")
        == "USER: <image>\nWhat's the content of the image? ASSISTANT:"
    )


@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
@pytest.mark.parametrize("question", ["What is this?", "Describe the image.\nBe brief.", ""])
def test_matches_llava_hf_chat_template(tiny_tok_dir, n_images, question):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tok_dir)
    content = [{"type": "image"}] * n_images + ([{"type": "text", "text": question}] if question else [])
    messages = [{"role": "user", "content": content}]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=LLAVA_HF_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert llava15_prompt(question, n_images) == rendered


def test_system_prompt_original_llava_format():
    prompt = llava15_prompt("Q?", system=LLAVA15_SYSTEM_PROMPT)
    assert prompt == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nQ? ASSISTANT:"
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_images"):
        llava15_prompt("q", -1)
    with pytest.raises(TypeError, match="question"):
        llava15_prompt(None)  # type: ignore[arg-type]
