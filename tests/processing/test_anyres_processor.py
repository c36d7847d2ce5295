"""LlavaNextProcessor against transformers' LlavaNextProcessor (tiny tokenizer), and the LLaVA-1.6 prompts
against the llava-hf chat templates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from avl.processing.anyres import DEFAULT_GRID_PINPOINTS, LlavaNextImageProcessor
from avl.processing.chat import LLAVA15_SYSTEM_PROMPT
from avl.processing.llava_next import LlavaNextProcessor, llava_next_prompt
from avl.processing.tokenizer import Tokenizer

TINY_PINPOINTS = [[24, 48], [48, 24], [48, 48]]
IMAGE_ID, PAD_ID = 510, 511  # the tiny tokenizer's <image> and <pad>

# The "[INST]" chat_template.json of the llava-hf LLaVA-1.6 checkpoints (the text published with
# llava-hf/llava-v1.6-34b-hf and with copies of llava-v1.6-mistral-7b-hf), copied: tests do not download.
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# chat_template.json of llava-hf/llava-1.5-7b-hf; the llava-v1.6-vicuna-*-hf model cards prompt in the same
# format: "<system prompt> USER: <image>\n<question> ASSISTANT:"
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def render(template: str, question: str, n_images: int, system: str | None = None) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    user = {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [user]
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True)
    return rendered[0]


@pytest.mark.parametrize("question,n_images", [("What is shown in this image?", 1), ("Compare them.", 2), ("Hi", 0)])
def test_prompts_equal_the_chat_templates(question, n_images):
    assert llava_next_prompt(question, "mistral", n_images) == render(MISTRAL_TEMPLATE, question, n_images)
    assert llava_next_prompt(question, "vicuna", n_images) == render(VICUNA_TEMPLATE, question, n_images)
    with_system = llava_next_prompt(question, "vicuna", n_images, system=LLAVA15_SYSTEM_PROMPT)
    assert with_system == render(VICUNA_TEMPLATE, question, n_images, system=LLAVA15_SYSTEM_PROMPT)


def test_prompt_examples_and_errors():
    assert llava_next_prompt("What is this?", "mistral") == "[INST] <image>\nWhat is this? [/INST]"
    assert llava_next_prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    with pytest.raises(ValueError, match=r"variant='llama3' is not a LLaVA-1.6 prompt format"):
        llava_next_prompt("q", "llama3")
    with pytest.raises(ValueError, match="mistral chat template has no system role"):
        llava_next_prompt("q", "mistral", system="be brief")


def hf_processor(tok_dir, tile: int = 24, patch: int = 6, pinpoints=TINY_PINPOINTS):
    from transformers import AutoTokenizer
    from transformers import LlavaNextProcessor as HFProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    return HFProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(tok_dir),
                       patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def hf_call(processor, prompts, images):
    return processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")


@pytest.fixture(scope="module")
def ours(tiny_tok_dir) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=TINY_PINPOINTS, size=24, crop_size=24)
    return LlavaNextProcessor(Tokenizer.from_dir(tiny_tok_dir), image_processor, patch_size=6)


@pytest.fixture(scope="module")
def reference(tiny_tok_dir):
    return hf_processor(tiny_tok_dir)


CASES = [  # prompts, image (width, height) in placeholder order
    ([llava_next_prompt("What is it?", "mistral")], [(30, 30)]),
    ([llava_next_prompt("What is it?"), llava_next_prompt("Compare these two.", n_images=2)],
     [(40, 20), (20, 60), (50, 30)]),
    (["<image>", "text before <image>\nand after, ünïcode 🙂", "no image at all"], [(1, 1), (300, 77)]),
]


@pytest.mark.parametrize("prompts,image_sizes", CASES)
def test_matches_transformers(ours, reference, make_image, prompts, image_sizes):
    images = [make_image(w, h, mode="RGBA" if i % 2 else "RGB", seed=i) for i, (w, h) in enumerate(image_sizes)]
    out, ref = ours(prompts, images), hf_call(reference, prompts, images)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    for key in out:
        assert torch.equal(out[key], ref[key]), key
    counts = [ours.num_image_tokens((h, w)) for w, h in image_sizes]
    assert int((out["input_ids"] == IMAGE_ID).sum()) == sum(counts)
    assert len(set(counts)) > 1 or len(counts) == 1


def test_each_placeholder_gets_its_own_images_count(ours, make_image):
    """Two images of one prompt: 16 + 4 x 9 = 52 tokens (40 x 20), then 16 + 8 x 3 = 40 tokens (20 x 60)."""
    out = ours("a <image> b <image> c", [make_image(40, 20), make_image(20, 60)])
    ids = out["input_ids"][0].tolist()
    first = ids.index(IMAGE_ID)
    assert ids[first: first + 52] == [IMAGE_ID] * 52 and ids[first + 52] != IMAGE_ID
    second = ids.index(IMAGE_ID, first + 52)
    assert ids[second: second + 40] == [IMAGE_ID] * 40 and ids[second + 40] != IMAGE_ID
    assert out["image_sizes"].tolist() == [[20, 40], [60, 20]]


def test_text_only_has_no_image_tensors(ours, reference):
    out = ours(["hello there", "a longer text-only prompt"])
    ref = reference(text=["hello there", "a longer text-only prompt"], padding=True, padding_side="left",
                    return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}
    assert torch.equal(out["input_ids"], ref["input_ids"]) and torch.equal(out["attention_mask"], ref["attention_mask"])


def test_placeholder_count_errors(ours, make_image):
    image = make_image(30, 30)
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*1 image"):
        ours(llava_next_prompt("q", n_images=2), [image])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*no images"):
        ours("<image> q")
    with pytest.raises(ValueError, match=r"patch_size=5 must be an int >= 1 that divides the tile size 24"):
        LlavaNextProcessor(ours.tokenizer, ours.image_processor, patch_size=5)


PREPROCESSOR_CONFIG = {  # llava-hf/llava-v1.6-mistral-7b-hf
    "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": [list(p) for p in DEFAULT_GRID_PINPOINTS],
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "LlavaNextImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
PROCESSOR_CONFIG = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                    "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"}


def write_checkpoint_dir(root, tok_dir, processor_config=None, config=None):
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, root / name)
    (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    if processor_config is not None:
        (root / "processor_config.json").write_text(json.dumps(processor_config))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def test_from_dir_matches_transformers_auto_processor(tmp_path, tiny_tok_dir, make_image):
    from transformers import AutoProcessor

    root = write_checkpoint_dir(tmp_path / "ckpt", tiny_tok_dir, processor_config=PROCESSOR_CONFIG)
    processor = LlavaNextProcessor.from_dir(root)
    assert (processor.patch_size, processor.image_token_id, processor.pad_token_id) == (14, IMAGE_ID, PAD_ID)
    assert processor.image_processor.image_grid_pinpoints == DEFAULT_GRID_PINPOINTS
    reference = AutoProcessor.from_pretrained(root, backend="pil")
    prompts = [llava_next_prompt("Hi?", "mistral"), llava_next_prompt("Wide?", "mistral")]
    images = [make_image(120, 90, seed=1), make_image(200, 60, seed=2)]
    out, ref = processor(prompts, images), hf_call(reference, prompts, images)
    for key in out:
        assert torch.equal(out[key], ref[key]), key
    assert [processor.num_image_tokens(s) for s in out["image_sizes"].tolist()] == [
        int(n) for n in (out["input_ids"] == IMAGE_ID).sum(-1)]


def test_from_dir_config_json_fallback_and_errors(tmp_path, tiny_tok_dir):
    config = {"image_token_index": IMAGE_ID, "vision_config": {"patch_size": 14}}
    processor = LlavaNextProcessor.from_dir(write_checkpoint_dir(tmp_path / "a", tiny_tok_dir, config=config))
    assert processor.patch_size == 14
    with pytest.raises(ValueError, match="cannot infer patch_size"):
        LlavaNextProcessor.from_dir(write_checkpoint_dir(tmp_path / "b", tiny_tok_dir))
    with pytest.raises(ValueError, match=r"image_token_index=32000 but the tokenizer's '<image>' id is 510"):
        LlavaNextProcessor.from_dir(write_checkpoint_dir(tmp_path / "c", tiny_tok_dir,
                                                         config={**config, "image_token_index": 32000}))
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full' in processor_config.json"):
        LlavaNextProcessor.from_dir(write_checkpoint_dir(tmp_path / "d", tiny_tok_dir, processor_config={
            **PROCESSOR_CONFIG, "vision_feature_select_strategy": "full"}))
