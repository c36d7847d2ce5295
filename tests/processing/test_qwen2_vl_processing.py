"""Qwen2-VL processing against transformers: the slow image processor (`Qwen2VLImageProcessorPil`,
pixel-identical), the Qwen2 tokenizer from `tokenizer.json`, `Qwen2VLProcessor` (placeholder
expansion, left padding, mm_token_type_ids) and `apply_chat_template`, on a tiny tokenizer built here."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from avl.processing.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor, smart_resize
from avl.processing.tokenizer import Tokenizer
from tiny_qwen2_vl import CHAT_TEMPLATE, IMAGE_ID, build_qwen2_tokenizer

SIZES = [(640, 480), (480, 640), (13, 9), (1, 1), (28, 28), (57, 29), (2000, 12), (12, 2000), (2048, 1536), (333, 777)]
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 200704, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = random.Random(seed * 7919 + width * 31 + height)
    image = Image.frombytes("RGBA", (width, height), rng.randbytes(width * height * 4))
    return image.convert("RGB").quantize(16) if mode == "P" else image.convert(mode)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2_vl_proc")
    build_qwen2_tokenizer(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "image_token_id": IMAGE_ID}))
    return directory


@pytest.fixture(scope="module")
def hf_processor(checkpoint):
    from transformers import AutoTokenizer, Qwen2VLProcessor as HFProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(HFProcessor):
        """transformers' processor without its video processor (that one needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=PREPROCESSOR["min_pixels"],
                                               max_pixels=PREPROCESSOR["max_pixels"])
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(checkpoint),
                              video_processor=None, chat_template=CHAT_TEMPLATE)


@pytest.mark.parametrize("limits", [{}, {"min_pixels": 3136, "max_pixels": 200704}, {"min_pixels": 100_000}])
def test_pixels_are_identical_to_the_slow_processor(limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf, ours = Qwen2VLImageProcessorPil(**limits), Qwen2VLImageProcessor(**limits)
    for width, height in SIZES:
        image = noise(width, height)
        ref = hf(images=[image], return_tensors="pt")
        out = ours([image])
        assert out["pixel_values"].dtype == torch.float32
        assert torch.equal(out["pixel_values"], ref["pixel_values"]), (width, height, limits)
        assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"]), (width, height, limits)
        assert ours.num_image_tokens(height, width) == int(ref["image_grid_thw"].prod()) // 4


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_other_modes_and_batches_are_identical(mode):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = [noise(90, 60, mode, seed=1), noise(31, 200, mode, seed=2)]
    ref = Qwen2VLImageProcessorPil()(images=images, return_tensors="pt")
    out = Qwen2VLImageProcessor()(images)
    assert torch.equal(out["pixel_values"], ref["pixel_values"]) and torch.equal(out["image_grid_thw"],
                                                                                 ref["image_grid_thw"])


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = random.Random(0)
    for _ in range(500):
        height, width = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(height, width) / min(height, width) > 200:
            continue
        lo = rng.choice([56 * 56, 3136, 200_000])
        hi = rng.choice([lo, 200_704, 1_003_520, 12_845_056])
        assert smart_resize(height, width, 28, lo, hi) == hf_smart_resize(height, width, 28, lo, hi)


def test_preprocessor_config_and_bad_values(checkpoint):
    processor = Qwen2VLImageProcessor.from_preprocessor_config(checkpoint)
    assert (processor.min_pixels, processor.max_pixels) == (3136, 200704)
    sized = Qwen2VLImageProcessor.from_preprocessor_config({"size": {"shortest_edge": 1000, "longest_edge": 9000}})
    assert (sized.min_pixels, sized.max_pixels) == (1000, 9000)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="min_pixels=10 is above max_pixels=5"):
        Qwen2VLImageProcessor(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="merge_size=0"):
        Qwen2VLImageProcessor(merge_size=0)


def test_tokenizer_json_tokenizes_like_transformers(checkpoint, hf_processor):
    ours = Tokenizer.from_dir(checkpoint)
    for text in ["Describe this image.", "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What's in it?",
                 "  spaces   and\ttabs\n\n 123 4567 ünïcödé", "<|im_end|><|endoftext|>"]:
        assert ours.encode(text) == hf_processor.tokenizer(text)["input_ids"], text
    assert ours.eos_token_id == hf_processor.tokenizer.eos_token_id
    assert ours.pad_token_id == hf_processor.tokenizer.pad_token_id


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]}],
    [{"role": "user", "content": "How many dogs are there?"}, {"role": "assistant", "content": "Two."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]}],
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("kwargs", [{}, {"add_vision_id": True}, {"add_generation_prompt": False}])
def test_chat_template_renders_like_transformers(checkpoint, hf_processor, index, kwargs):
    processor = Qwen2VLProcessor.from_dir(checkpoint)
    messages = CONVERSATIONS[index]
    generation = kwargs.get("add_generation_prompt", True)
    extra = {k: v for k, v in kwargs.items() if k != "add_generation_prompt"}
    ref = hf_processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False, **extra)
    assert processor.apply_chat_template(messages, add_generation_prompt=generation, **extra) == ref


def test_processor_outputs_equal_transformers(checkpoint, hf_processor):
    processor = Qwen2VLProcessor.from_dir(checkpoint)
    prompts = [processor.apply_chat_template(m) for m in CONVERSATIONS]
    images = [noise(300, 200, seed=1), noise(64, 400, seed=2), noise(29, 29, seed=3), noise(1200, 50, seed=4)]
    ref = hf_processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    out = processor(prompts, images)
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    for name, value in out.items():
        assert torch.equal(value, ref[name].to(value.dtype)), name
    per_image = (out["image_grid_thw"].prod(-1) // 4).tolist()
    assert int((out["input_ids"] == IMAGE_ID).sum()) == sum(per_image)


def test_processor_bad_inputs_are_named(checkpoint, tmp_path):
    processor = Qwen2VLProcessor.from_dir(checkpoint)
    with pytest.raises(ValueError, match="placeholder"):
        processor("<|vision_start|><|image_pad|><|vision_end|>Hi", images=None)
    with pytest.raises(ValueError, match="placeholder"):
        processor("no image here", images=[noise(30, 30)])
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"image_token_id": 5}))
    with pytest.raises(ValueError, match="image_token_id=5"):
        Qwen2VLProcessor.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat_template"):
        Qwen2VLProcessor.from_dir(tmp_path).apply_chat_template(CONVERSATIONS[0])
