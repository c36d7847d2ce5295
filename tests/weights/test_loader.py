"""load_checkpoint / read_checkpoint on a toy tree, in the hub's layouts, and each bad checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from avl.weights import CheckpointError, KeyMap, load_checkpoint, read_checkpoint, save_sharded


def _assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("layout", ["new", "old"])
def test_single_file_and_sharded_load_equal(toy, make_ckpt, layout: str) -> None:
    state = toy.random_state()
    single = make_ckpt(state, layout, name="single")
    sharded = make_ckpt(state, layout, shard_bytes=1024, name="sharded")
    assert (single / "model.safetensors").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2

    a = load_checkpoint(toy.meta_toy(), single, toy.KEYS, dtype=None, device="cpu")
    b = load_checkpoint(toy.meta_toy(), sharded, toy.KEYS, dtype=None, device="cpu")
    _assert_state_equal(a, state)
    _assert_state_equal(b, state)
    assert all(not p.is_meta for p in b.parameters())
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(a.lm_head(a.model.embed_tokens(x)), b.lm_head(b.model.embed_tokens(x)))


def test_read_checkpoint_renames_and_ignores(toy, tmp_path: Path) -> None:
    state = toy.random_state()
    ckpt_state = toy.to_layout(state, "old")
    ckpt_state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    out = tmp_path / "rot"
    save_sharded(ckpt_state, out, 1 << 20, config={})
    got = read_checkpoint(out, toy.KEYS)
    assert got.keys() == state.keys()
    # the ignored tensor does not make the load fail either
    load_checkpoint(toy.meta_toy(), out, toy.KEYS)


def test_dtype_cast(toy, make_ckpt) -> None:
    state = toy.random_state()
    model = load_checkpoint(toy.meta_toy(), make_ckpt(state), toy.KEYS, dtype=torch.bfloat16, device="cpu")
    for name, t in model.state_dict().items():
        if state[name].is_floating_point():
            assert t.dtype == torch.bfloat16, name
            assert torch.equal(t, state[name].to(torch.bfloat16)), name
        else:  # integer buffers are never cast
            assert t.dtype == torch.int64 and torch.equal(t, state[name]), name


def test_bfloat16_checkpoint_keeps_dtype_when_none(toy, make_ckpt) -> None:
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in toy.random_state().items()}
    model = load_checkpoint(toy.meta_toy(), make_ckpt(state, shard_bytes=512), toy.KEYS, dtype=None)
    _assert_state_equal(model, state)


def test_missing_key_is_named(toy, make_ckpt) -> None:
    state = toy.random_state()
    del state["model.layers.1.mlp.weight"]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(toy.meta_toy(), make_ckpt(state), toy.KEYS)
    assert "1 missing key(s) (model parameters with no checkpoint tensor): model.layers.1.mlp.weight" in str(
        err.value
    )
    assert err.value.missing == ["model.layers.1.mlp.weight"]
    assert not err.value.unexpected and not err.value.mismatched


def test_unexpected_key_is_named(toy, make_ckpt) -> None:
    state = toy.random_state()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(toy.meta_toy(), make_ckpt(state, "old"), toy.KEYS)
    msg = str(err.value)
    assert "1 unexpected key(s)" in msg
    assert (
        "model.layers.0.self_attn.k_proj.weight "
        "(checkpoint key language_model.model.layers.0.self_attn.k_proj.weight)" in msg
    )
    assert err.value.unexpected == ["model.layers.0.self_attn.k_proj.weight"]


def test_misshaped_key_is_named_with_shapes(toy, make_ckpt) -> None:
    state = toy.random_state()
    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(8, 9)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(toy.meta_toy(), make_ckpt(state), toy.KEYS)
    assert (
        "1 mis-shaped key(s): model.layers.1.self_attn.q_proj.weight (checkpoint key "
        "model.language_model.layers.1.self_attn.q_proj.weight): checkpoint [8, 9] vs model [8, 8]"
    ) in str(err.value)
    assert err.value.mismatched == [("model.layers.1.self_attn.q_proj.weight", (8, 9), (8, 8))]


def test_all_problems_in_one_error_and_long_lists_truncated(toy, make_ckpt) -> None:
    state = toy.random_state()
    del state["lm_head.weight"]
    state["model.norm"] = torch.ones(3)
    for i in range(25):
        state[f"extra.{i:02d}"] = torch.ones(1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(toy.meta_toy(), make_ckpt(state), toy.KEYS)
    msg = str(err.value)
    assert msg.startswith("checkpoint '") and "' does not match Toy:" in msg.splitlines()[0]
    assert "missing key(s) (model parameters with no checkpoint tensor): lm_head.weight" in msg
    assert "25 unexpected key(s)" in msg and "extra.19, ... and 5 more" in msg and "extra.20" not in msg
    assert "model.norm (checkpoint key model.language_model.norm): checkpoint [3] vs model [8]" in msg
    assert len(err.value.unexpected) == 25


def test_two_layouts_mixed_is_a_clash(toy, make_ckpt, tmp_path: Path) -> None:
    state = toy.random_state()
    mixed = {**toy.to_layout(state, "new"), **toy.to_layout(state, "old")}
    save_sharded(mixed, tmp_path / "mixed", 2048, config={})
    with pytest.raises(CheckpointError, match=r"model name\(s\) given by more than one checkpoint tensor"):
        load_checkpoint(toy.meta_toy(), tmp_path / "mixed", toy.KEYS)


def test_tied_weight_absent_from_file_is_tied(toy, make_ckpt) -> None:
    state = toy.random_state(tie=True)
    del state["lm_head.weight"]
    ckpt = make_ckpt(state)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    with pytest.raises(CheckpointError, match="missing key.*lm_head.weight"):
        load_checkpoint(toy.meta_toy(tie=True), ckpt, toy.KEYS)  # not declared tied
    model = load_checkpoint(toy.meta_toy(tie=True), ckpt, toy.KEYS, tied=tied)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    assert len(list(model.parameters())) == len(state) - 1  # one shared Parameter, not two


def test_tied_weight_present_in_file_is_still_tied(toy, make_ckpt) -> None:
    state = toy.random_state(tie=True)
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    model = load_checkpoint(
        toy.meta_toy(tie=True), make_ckpt(state, "old"), toy.KEYS, tied=tied, dtype=torch.float64
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float64


def test_tied_names_must_exist(toy, make_ckpt) -> None:
    with pytest.raises(ValueError, match=r"'lm_head.w' <- 'model.embed_tokens.weight'"):
        load_checkpoint(
            toy.meta_toy(),
            make_ckpt(toy.random_state()),
            toy.KEYS,
            tied={"lm_head.w": "model.embed_tokens.weight"},
        )


def test_parameter_left_on_meta_is_named(toy, make_ckpt) -> None:
    class WithBuffer(toy.Toy):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("inv_freq", torch.ones(4), persistent=False)

    with torch.device("meta"):
        model = WithBuffer()
    with pytest.raises(
        CheckpointError,
        match=r"1 parameter\(s\)/buffer\(s\) of WithBuffer are still on the meta device.*: inv_freq",
    ):
        load_checkpoint(model, make_ckpt(toy.random_state()), toy.KEYS)


def test_missing_shard_fails_before_reading(toy, make_ckpt) -> None:
    ckpt = make_ckpt(toy.random_state(), shard_bytes=512)
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {shards[1].name}"):
        load_checkpoint(toy.meta_toy(), ckpt, toy.KEYS)


def test_no_weights_file(toy, tmp_path: Path) -> None:
    toy.write_config(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no weights found in .*looked for model.safetensors"):
        load_checkpoint(toy.meta_toy(), tmp_path / "empty", toy.KEYS)


def test_corrupt_safetensors_file(toy, tmp_path: Path) -> None:
    toy.write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors"):
        load_checkpoint(toy.meta_toy(), tmp_path, toy.KEYS)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_checkpoints(toy, tmp_path: Path, sharded: bool) -> None:
    state = toy.random_state()
    ckpt = toy.to_layout(state, "old")
    toy.write_config(tmp_path)
    if sharded:
        keys = list(ckpt)
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        for n, ks in zip(names, halves, strict=True):
            torch.save({k: ckpt[k] for k in ks}, tmp_path / n)
        index = {"metadata": {}, "weight_map": {k: n for n, ks in zip(names, halves, strict=True) for k in ks}}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(ckpt, tmp_path / "pytorch_model.bin")
    model = load_checkpoint(toy.meta_toy(), tmp_path, toy.KEYS, dtype=torch.float32)
    _assert_state_equal(model, state)


def test_bin_with_non_tensor_entries(toy, tmp_path: Path) -> None:
    toy.write_config(tmp_path)
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"entries that are not named tensors: \['step'\]"):
        read_checkpoint(tmp_path)


def test_identity_keymap_and_model_layout(toy, make_ckpt) -> None:
    state = toy.random_state()
    model = load_checkpoint(toy.meta_toy(), make_ckpt(state, "model"), KeyMap())
    _assert_state_equal(model, state)
