"""save_sharded writes the hub's single-file and sharded safetensors layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avl.weights import save_sharded
from avl.weights.writer import parse_size


def test_single_file_when_it_fits(tmp_path: Path) -> None:
    state = {"a": torch.ones(10), "b": torch.zeros(3, 2, dtype=torch.bfloat16)}
    paths = save_sharded(state, tmp_path, 10 * 4 + 6 * 2, config={"x": 1})
    assert paths == [tmp_path / "model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == {"x": 1}
    got = load_file(paths[0])
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_sharded_layout_and_index(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(5)}  # 32 bytes each
    state["big"] = torch.ones(100)  # larger than a shard: gets one of its own
    paths = save_sharded(state, tmp_path, 70)
    names = [p.name for p in paths]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 32 + 400
    assert index["weight_map"] == {
        "t0": names[0],
        "t1": names[0],
        "t2": names[1],
        "t3": names[1],
        "t4": names[2],
        "big": names[3],
    }
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / shard)[name], state[name])


def test_shared_and_view_tensors_are_written(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    state = {"embed": w, "lm_head": w, "row": w[1]}
    save_sharded(state, tmp_path, "1MB")
    got = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("text", "value"), [(123, 123), ("5GB", 5 * 10**9), ("200MiB", 200 * 2**20), ("1.5kB", 1500), ("64", 64)]
)
def test_parse_size(text: int | str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["5 parsecs", "", 0, -1, "GB"])
def test_parse_size_rejects(bad: int | str) -> None:
    with pytest.raises(ValueError, match="shard size"):
        parse_size(bad)
