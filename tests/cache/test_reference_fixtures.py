"""Every run of every A-VL reference fixture (tests/fixtures/avl-reference, plus the folders under
$AVL_REFERENCE_FIXTURES), reproduced in float64.

The folders hold outputs of the A-VL authors' release (see its README); the policy of each run
is translated from the authors' flags here, so new folders and runs need no code change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import avl
from tiny_llava import AVL_FIXTURES

def policy_from_flags(flags: dict) -> avl.Policy:
    """The authors' flags -> our policy. Their rates are shares dropped; ours are shares kept."""
    if flags.get("all_use_h2o"):
        return avl.H2O(budget=0.5, heavy_share=0.25)
    vision = flags.get("vision_adaptive_attention", False)
    prefill = flags.get("prefill_filter_flag", False)
    text = flags.get("text_pruning_flag", False)
    if prefill and not vision and not text:
        return avl.FastV(layer=flags["prefill_filter_layer"], keep=1 - flags["prefill_filter_rate"])
    if not (vision or prefill or text):
        return avl.Full()
    split = vision and flags.get("vision_adaptive_attention_update_interval", -1) > 0
    return avl.AVL(
        secondary=round(1 - flags["vision_adaptive_attention_rate"], 6) if vision else None,
        core=round(1 - flags["vision_adaptive_attention_compute_rate"], 6) if split else None,
        refresh_every=flags["vision_adaptive_attention_update_interval"] if split else None,
        prefill_keep=round(1 - flags["prefill_filter_rate"], 6) if prefill else None,
        prefill_layer=flags.get("prefill_filter_layer", 2),
        text_keep=round(1 - flags["text_pruning_rate"], 6) if text else None,
        text_heavy_share=flags.get("text_h20_hh_rate_in_cache", 0.5),
        text_min_budget=flags.get("text_init_cache", 4),
    )


def runs() -> list:
    params = []
    for folder in AVL_FIXTURES:
        for name, run in json.loads((folder / "expected.json").read_text())["runs"].items():
            params.append(pytest.param(folder, name, run["settings"], id=f"{folder.name}-{name}"))
    return params


_models: dict[Path, torch.nn.Module] = {}


@pytest.mark.parametrize("folder,name,flags", runs())
def test_reference_run(folder: Path, name: str, flags: dict):
    if folder not in _models:
        _models[folder] = avl.load(folder)
    model = _models[folder]
    meta = json.loads((folder / "expected.json").read_text())
    expected = load_file(folder / "expected.safetensors")
    ids = expected["input_ids"][0].tolist()
    image_token, n_features = meta["image_token_index"], model.config.image_tokens_per_image
    at = ids.index(image_token)
    ids = torch.tensor([ids[:at] + [image_token] * n_features + ids[at + 1:]])
    steps = meta["n_new_tokens"]
    out = avl.generate(model, ids, pixel_values=expected["pixel_values"], policy=policy_from_flags(flags),
                       max_new_tokens=steps, output_logits=True)
    assert out.tokens[0].tolist() == expected[f"{name}.tokens"].tolist()
    assert (out.logits[0] - expected[f"{name}.logits"]).abs().max() <= 1e-4


def test_the_bundled_fixture_is_found():
    assert [f.name for f in AVL_FIXTURES[:1]] == ["llava-tiny-seed0"]
