"""The one family table (avl.families) behind avl.load, load_chat_processor and avl eval; several images
in one chat prompt against transformers' LLaVA processor and generation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

import avl
from avl.families import FAMILIES, get_family
from avl.models.llava import Llava
from avl.processing.auto import load_chat_processor
from avl.testing.llava_checkpoint import build_tiny_llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def two_images():
    return [Image.new("RGB", (50, 70), (200, 10, 10)), Image.new("RGB", (90, 40), (10, 200, 10))]


def test_every_family_is_complete():
    assert sorted(FAMILIES) == ["llava", "llava_next", "llava_onevision", "mllama", "qwen", "qwen2_5_vl", "qwen2_vl"]
    for model_type, family in FAMILIES.items():
        assert family.model_type == model_type
        assert callable(family.config_class.from_dict) and callable(family.model_class.prefill)
        assert family.key_map.rules, model_type  # every family renames the hub's keys
        assert "Q?" in family.prompt("Q?") and family.lmms_eval_model


def test_unknown_model_type_is_named_with_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"model_type='blip-2', which avl does not support.*supported: \['llava', "):
        get_family("blip-2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} has model_type='blip-2'.*'qwen2_vl'\]"):
        load_chat_processor(tmp_path)


def test_a_family_added_to_the_table_is_loaded_and_prompted_without_other_edits(tiny, tmp_path, monkeypatch):
    """avl.load and load_chat_processor read nothing but the table: a copy of LLaVA under a new model_type works."""
    monkeypatch.setitem(FAMILIES, "llava_copy", dataclasses.replace(FAMILIES["llava"], model_type="llava_copy"))
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = json.loads((tiny / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llava_copy"}))
    model = avl.load(copy)
    assert isinstance(model, Llava)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), avl.load(tiny).state_dict().values()))
    assert load_chat_processor(copy).prompt("Q?", 1) == load_chat_processor(tiny).prompt("Q?", 1)


def test_chat_processor_one_image_or_a_list_per_question(tiny, two_images):
    processor = load_chat_processor(tiny)
    single, listed = processor(["Q?"], [two_images[0]]), processor(["Q?"], [[two_images[0]]])
    assert all(torch.equal(single[k], listed[k]) for k in single)
    with pytest.raises(ValueError, match="got 2 question"):
        processor(["Q?", "R?"], [two_images[0]])


@torch.inference_mode()
def test_two_images_in_one_prompt_match_transformers(tiny, two_images):
    """Two images before one question: input_ids / pixel_values as transformers' LlavaProcessor makes them from
    llava-hf's chat format ("USER: <image>\\n<image>\\n{q} ASSISTANT:"), and the greedy tokens of its model."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

    hf_processor = LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(tiny),
                                  tokenizer=AutoTokenizer.from_pretrained(tiny), patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    expected = hf_processor(text=["USER: <image>\n<image>\nColor? ASSISTANT:"], images=two_images, return_tensors="pt")
    processor = load_chat_processor(tiny)
    inputs = processor(["Color?"], [two_images])
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(inputs[key], expected[key]), key
    assert inputs["pixel_values"].shape[0] == 2
    assert int((inputs["input_ids"] == hf_processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 2 * 576

    hf = LlavaForConditionalGeneration.from_pretrained(tiny).to(torch.float64).eval()
    steps = 4
    reference = hf.generate(**{k: v.to(torch.float64) if v.is_floating_point() else v for k, v in expected.items()},
                            max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    out = avl.generate(avl.load(tiny, dtype="float64"), **inputs, max_new_tokens=steps)
    assert out.tokens.tolist() == reference[:, inputs["input_ids"].shape[1]:].tolist()
