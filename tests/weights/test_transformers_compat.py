"""Checkpoints written by transformers' own ``save_pretrained`` are found and read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from avl.weights import KeyMap, checkpoint_files, load_checkpoint, read_checkpoint, read_config

transformers = pytest.importorskip("transformers")


def _tiny_llama(tie: bool) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


class ParamTree(nn.Module):
    """Modules nested by dotted name, holding parameters of the given shapes (built on meta)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        children: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, shape in shapes.items():
            head, dot, rest = name.partition(".")
            if dot:
                children.setdefault(head, {})[rest] = shape
            else:
                self.register_parameter(head, nn.Parameter(torch.empty(shape)))
        for head, sub in children.items():
            self.add_module(head, ParamTree(sub))


@pytest.mark.parametrize(("max_shard_size", "tie"), [("3KB", False), ("3KB", True), ("1GB", False)])
def test_reads_save_pretrained_output(tmp_path: Path, max_shard_size: str, tie: bool) -> None:
    hf = _tiny_llama(tie)
    hf.save_pretrained(tmp_path, max_shard_size=max_shard_size)

    files = checkpoint_files(tmp_path)
    assert sorted(files) == sorted(tmp_path.glob("*.safetensors"))
    if max_shard_size == "1GB":
        assert files == [tmp_path / "model.safetensors"]
    else:
        assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert read_config(tmp_path)["tie_word_embeddings"] is tie

    expected = {k: v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    got = read_checkpoint(tmp_path)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Load into our own tree under other names, through a key map, re-tying lm_head.
    keys = KeyMap(rules=[("model.", "decoder."), ("lm_head.", "head.")], ignore=[r"rotary_emb\.inv_freq$"])
    shapes = {keys.rename(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    with torch.device("meta"):
        ours = ParamTree(shapes)  # type: ignore[arg-type]
    tied = {"head.weight": "decoder.embed_tokens.weight"} if tie else None
    load_checkpoint(ours, tmp_path, keys, dtype=torch.float64, tied=tied)
    for k, v in hf.state_dict().items():
        mine = ours.get_parameter(keys.rename(k))  # type: ignore[arg-type]
        assert mine.dtype == torch.float64 and torch.equal(mine, v.double()), k
    if tie:
        assert ours.get_parameter("head.weight") is ours.get_parameter("decoder.embed_tokens.weight")
