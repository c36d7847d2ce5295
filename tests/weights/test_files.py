"""config.json reading and weight-file discovery in the hub's layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avl.weights import CheckpointError, checkpoint_files, read_config, save_sharded


def test_read_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert read_config(tmp_path) == {"hidden_size": 8}


def test_read_config_missing_names_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no config.json in checkpoint directory '{tmp_path}'"):
        read_config(tmp_path)


def test_read_config_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 8,,}')
    with pytest.raises(CheckpointError, match=r"config\.json' is not valid JSON: .*line 1"):
        read_config(tmp_path)


def test_read_config_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object, got list"):
        read_config(tmp_path)


def _state(n: int = 4) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((16,), float(i)) for i in range(n)}


def test_single_file(tmp_path: Path) -> None:
    paths = save_sharded(_state(), tmp_path, 10_000)
    assert paths == [tmp_path / "model.safetensors"]
    assert checkpoint_files(tmp_path) == paths


def test_sharded_files_in_index_order(tmp_path: Path) -> None:
    paths = save_sharded(_state(4), tmp_path, 64 * 2)  # two 64-byte tensors per shard
    assert [p.name for p in paths] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert checkpoint_files(tmp_path) == paths


def test_single_file_wins_over_index(tmp_path: Path) -> None:
    save_sharded(_state(4), tmp_path, 128)
    save_sharded(_state(4), tmp_path, 1 << 20)
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_missing_shard_is_named(tmp_path: Path) -> None:
    paths = save_sharded(_state(4), tmp_path, 128)
    paths[1].unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"1 shard file\(s\) listed in .*index\.json' are missing: model-00002-of-00002\.safetensors",
    ):
        checkpoint_files(tmp_path)


def test_index_without_weight_map(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no 'weight_map'"):
        checkpoint_files(tmp_path)


def test_index_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="index.json' is not valid JSON"):
        checkpoint_files(tmp_path)


def test_index_shard_outside_directory(tmp_path: Path) -> None:
    index = {"weight_map": {"w": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map\['w'\] = '../elsewhere.safetensors'"):
        checkpoint_files(tmp_path)


def test_no_weights_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.ckpt").write_text("")
    with pytest.raises(FileNotFoundError) as err:
        checkpoint_files(tmp_path)
    msg = str(err.value)
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        assert name in msg
    assert "Files present: config.json, model.ckpt" in msg


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist' does not exist"):
        checkpoint_files(tmp_path / "does-not-exist")


def test_bin_single_and_sharded(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "pytorch_model.bin")
    assert checkpoint_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    (tmp_path / "pytorch_model.bin").unlink()
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    index = {"metadata": {}, "weight_map": {"w0": names[0], "w1": names[0], "w2": names[1]}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for n in names:
        torch.save({}, tmp_path / n)
    assert checkpoint_files(tmp_path) == [tmp_path / n for n in names]
