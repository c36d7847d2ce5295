"""avl.load on LLaVA checkpoints: sharded vs single file, and each bad checkpoint's message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import avl
from avl.weights import CheckpointError
from tiny_llava import save_hf_llava


def test_sharded_checkpoint_loads_the_same_as_a_single_file(tmp_path, hf_llava):
    single_dir, _ = hf_llava
    save_hf_llava(tmp_path, max_shard_size="100KB")  # same seed: same weights
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    sharded, single = avl.load(tmp_path).state_dict(), avl.load(single_dir).state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_dtype_argument_casts_the_weights(hf_llava):
    model = avl.load(hf_llava[0], dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.fixture
def broken(tmp_path, hf_llava):
    """A writable copy of the tiny checkpoint and its weights, to damage."""
    directory = tmp_path / "ckpt"
    shutil.copytree(hf_llava[0], directory)
    return directory, load_file(directory / "model.safetensors")


def test_missing_unexpected_and_misshaped_keys_are_named(broken):
    directory, state = broken
    missing = "language_model.model.layers.1.mlp.up_proj.weight"
    del state[missing]
    state["language_model.model.layers.0.extra.weight"] = torch.zeros(2)
    state["multi_modal_projector.linear_1.bias"] = torch.zeros(7, dtype=torch.float64)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        avl.load(directory)
    message = str(error.value)
    assert "language_model.layers.1.mlp.up_proj.weight" in message
    assert "language_model.model.layers.0.extra.weight" in message
    assert "multi_modal_projector.linear_1.bias" in message and "[7]" in message


def test_unsupported_family_is_named(broken):
    directory, _ = broken
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "blip-2"}))
    with pytest.raises(ValueError, match="model_type='blip-2'.*supported: \\[.*'llava'.*'qwen'.*\\]"):
        avl.load(directory)


def test_missing_weights_file_and_missing_directory(broken, tmp_path):
    directory, _ = broken
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        avl.load(directory)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        avl.load(tmp_path / "nowhere")


def test_a_config_with_an_unsupported_value_names_the_field(broken):
    directory, _ = broken
    config = json.loads((directory / "config.json").read_text())
    config["vision_feature_select_strategy"] = "mean"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='mean'"):
        avl.load(directory)
