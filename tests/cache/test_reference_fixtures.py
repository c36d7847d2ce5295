"""Every run of every A-VL reference fixture (tests/fixtures/avl-reference, plus the folders under
$AVL_REFERENCE_FIXTURES), reproduced in float64.

The folders hold outputs of the A-VL authors' release (see its README); the policy of each run
is translated from the authors' flags by `release_policy`, so new folders and runs need no code change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import avl
from avl.cache.release_flags import release_policy
from tiny_llava import AVL_FIXTURES


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
    out = avl.generate(model, ids, pixel_values=expected["pixel_values"], policy=release_policy(flags),
                       max_new_tokens=steps, output_logits=True)
    assert out.tokens[0].tolist() == expected[f"{name}.tokens"].tolist()
    assert (out.logits[0] - expected[f"{name}.logits"]).abs().max() <= 1e-4


def test_the_bundled_fixture_is_found():
    assert [f.name for f in AVL_FIXTURES[:1]] == ["llava-tiny-seed0"]
