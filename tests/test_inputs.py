"""Bad input to generate, the policies and config.json: each gets a ValueError naming the field and
what is allowed (issue 11, items 7 and 8), never a bare TypeError / IndexError / RuntimeError."""

from __future__ import annotations

import json

import pytest
import torch

import avl
from avl.inputs import check_device
from tiny_llava import prompt_ids


@pytest.fixture(scope="module")
def model(hf_llava):
    return avl.load(hf_llava[0])


def pixels(n: int, side: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def prompt() -> torch.Tensor:
    return torch.tensor([prompt_ids(3, 6, 16, 4)])


@pytest.mark.parametrize("make,match", [
    (lambda: avl.AVL(secondary=True), r"secondary=True is a bool; allowed: a ratio in \(0, 1\]"),
    (lambda: avl.AVL(secondary="0.5"), r"secondary='0.5' is a str; allowed: a ratio"),
    (lambda: avl.AVL(secondary=0.5, core=0.25, refresh_every=True), r"refresh_every=True is a bool; allowed: an "
                                                                     r"integer >= 1"),
    (lambda: avl.StreamingLLM(window=True), r"window=True is a bool; allowed: an integer >= 1"),
    (lambda: avl.StreamingLLM(sinks=2.0), r"sinks=2.0 is a float; allowed: an integer >= 0"),
    (lambda: avl.FastV(layer=True), r"layer=True is a bool; allowed: an integer >= 1"),
    (lambda: avl.FastV(keep="half"), r"keep='half' is a str; allowed: a ratio"),
    (lambda: avl.H2O(budget=False), r"budget=False is a bool; allowed: a ratio"),
])
def test_policy_fields_of_the_wrong_type_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": True}, r"max_new_tokens=True is invalid; allowed: an integer >= 1"),
    ({"max_new_tokens": 2.0}, r"max_new_tokens=2.0 is invalid"),
    ({"temperature": "hot"}, r"temperature='hot' is invalid; allowed: a number > 0"),
    ({"top_p": True}, r"top_p=True is invalid; allowed: a number in \(0, 1\]"),
    ({"policy": "avl"}, r"policy='avl' is invalid; allowed: a Policy instance .* not a str"),
    ({"policy": avl.FastV(layer=3)}, r"layer=3 is out of range; allowed: \[1, 2\]"),
    ({"feature_policy": avl.Trim()}, r"Trim\(keep=0.5.* this model has none"),
    ({"feature_policy": avl.Full()}, r"feature_policy=Full\(\) is invalid; allowed: a FeaturePolicy"),
])
def test_generate_arguments_of_the_wrong_type_or_for_another_model_are_named(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        avl.generate(model, prompt(), pixel_values=pixels(1), **kwargs)


def test_a_wrong_policy_fails_before_the_prefill_runs(model, monkeypatch):
    def prefill(*args, **kwargs):
        raise AssertionError("prefill ran")

    monkeypatch.setattr(model, "prefill", prefill)
    with pytest.raises(ValueError, match="layer=9 is out of range"):
        avl.generate(model, prompt(), pixel_values=pixels(1), policy=avl.FastV(layer=9))


def mask_with(values: list[int], length: int) -> torch.Tensor:
    return torch.tensor([[0] * (length - len(values)) + values])


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.index_fill_(1, torch.tensor([5]), 2), r"attention_mask holds 2 at sample 0, position 5; allowed: 0 "
                                                        r"\(padding\) and 1"),
    (lambda m: m.index_fill_(1, torch.tensor([7]), 0), r"attention_mask of sample 0 has a 0 at position 7 after its "
                                                        r"first 1 at position 0 \(a hole inside the prompt\)"),
    (lambda m: m.index_fill_(1, torch.tensor([m.shape[1] - 1]), 0), r"position 25 .*\(right padding\)"),
    (lambda m: m.zero_(), r"attention_mask of sample 0 is all 0 \(an empty prompt\)"),
    (lambda m: m.double(), r"attention_mask=.dtype torch.float64. is invalid"),
])
def test_bad_attention_masks_are_named(model, edit, match):
    ids = prompt()
    mask = edit(torch.ones_like(ids))
    with pytest.raises(ValueError, match=match):
        avl.generate(model, ids, pixel_values=pixels(1), attention_mask=mask)


def test_token_ids_beyond_the_embedding_are_named(model):
    ids = prompt()
    ids[0, 2] = 320  # the tiny model embeds 320 ids
    with pytest.raises(ValueError, match=r"input_ids hold 320 at sample 0, position 2 .*allowed: ids in \[0, 320\)"):
        avl.generate(model, ids, pixel_values=pixels(1))
    ids[0, 2] = -1
    with pytest.raises(ValueError, match=r"input_ids hold -1 at sample 0, position 2"):
        avl.generate(model, ids, pixel_values=pixels(1))


@pytest.mark.parametrize("images,match", [
    (pixels(1, side=96), r"pixel_values has shape \(1, 3, 96, 96\); expected \[images, 3, 48, 48\]"),
    (pixels(1)[:, :2], r"pixel_values has shape \(1, 2, 48, 48\); expected \[images, 3, 48, 48\]"),
    (pixels(1)[0], r"pixel_values has shape \(3, 48, 48\)"),
    (torch.zeros(1, 3, 48, 48, dtype=torch.uint8), r"pixel_values=.dtype torch.uint8. is invalid; allowed: a "
                                                   r"floating-point tensor"),
])
def test_pixel_values_of_the_wrong_shape_are_named(model, images, match):
    with pytest.raises(ValueError, match=match):
        avl.generate(model, prompt(), pixel_values=images)


@pytest.mark.parametrize("section,field,value,match", [
    ("text_config", "num_hidden_layers", "4", r"num_hidden_layers='4' is a JSON string \(LlamaConfig\); allowed: an "
                                              r"integer"),
    ("vision_config", "image_size", 48.0, r"image_size=48.0 is a JSON number \(ClipVisionConfig\); allowed: an "
                                          r"integer"),
    ("text_config", "rms_norm_eps", "1e-5", r"rms_norm_eps='1e-5' is a JSON string .*allowed: a number"),
    ("text_config", "tie_word_embeddings", 0, r"tie_word_embeddings=0 is a JSON number .*allowed: true or false"),
])
def test_config_json_values_of_the_wrong_type_are_named(hf_llava, tmp_path, section, field, value, match):
    import shutil

    directory = tmp_path / "ckpt"
    shutil.copytree(hf_llava[0], directory)
    raw = json.loads((directory / "config.json").read_text())
    raw[section][field] = value
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        avl.load(directory)


@pytest.mark.parametrize("device,match", [
    ("gpu", r"device='gpu' is not a device name"),
    ("cuda", r"device='cuda' is not available"),
])
def test_an_unavailable_or_malformed_device_is_named(device, match, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=match):
        check_device(device)


def test_load_checks_the_device_before_reading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        avl.load(tmp_path / "no-such-checkpoint", device="cuda")


def test_the_image_placeholder_id_may_lie_beyond_the_embedding(model, monkeypatch):
    """LLaVA overwrites its image positions with features and never embeds the placeholder id."""
    import dataclasses

    monkeypatch.setattr(model, "config", dataclasses.replace(model.config, image_token_index=330))
    ids = prompt().masked_fill(prompt() == 300, 330)
    out = avl.generate(model, ids, pixel_values=pixels(1), max_new_tokens=2)
    assert out.tokens.shape == (1, 2)
