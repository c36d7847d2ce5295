"""A toy model tree and checkpoint writers shared by the weight tests.

Model names follow the hub's LM naming (``model.layers.0.self_attn.q_proj.weight``); checkpoints
are written in two alternative layouts that one ``KeyMap`` reads:

* ``new``: ``model.language_model.<...>`` and ``lm_head.weight``
* ``old``: ``language_model.model.<...>`` and ``language_model.lm_head.weight``
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from avl.weights import KeyMap

VOCAB, DIM, LAYERS = 32, 8, 2


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=True)


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim)
        self.mlp = nn.Linear(dim, 2 * dim, bias=False)


class Decoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        # An integer persistent buffer: must be loaded, and never cast to a float dtype.
        self.register_buffer("layer_ids", torch.arange(layers), persistent=True)


class Toy(nn.Module):
    """embed + two "layers" + lm_head; ``tie`` shares lm_head.weight with embed_tokens.weight."""

    def __init__(self, tie: bool = False, vocab: int = VOCAB, dim: int = DIM) -> None:
        super().__init__()
        self.model = Decoder(vocab, dim, LAYERS)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight


TOY_KEYS = KeyMap(
    rules=[
        ("model.language_model.", "model."),  # new layout
        ("language_model.model.", "model."),  # old layout
        ("language_model.lm_head.", "lm_head."),
    ],
    ignore=[r"rotary_emb\.inv_freq$"],
)

# model name prefix -> checkpoint prefix, per layout (inverse of TOY_KEYS)
_LAYOUTS = {
    "new": [("model.", "model.language_model."), ("lm_head.", "lm_head.")],
    "old": [("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")],
    "model": [],
}


def to_layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename model names to a checkpoint layout ("new", "old" or "model" = unchanged)."""
    out = {}
    for name, t in state.items():
        for src, dst in _LAYOUTS[layout]:
            if name.startswith(src):
                name = dst + name[len(src) :]
                break
        out[name] = t
    return out


def random_state(tie: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 state dict of ``Toy`` with random values (cloned: no shared storage)."""
    torch.manual_seed(seed)
    model = Toy(tie=tie)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def meta_toy(**kwargs: object) -> Toy:
    with torch.device("meta"):
        return Toy(**kwargs)  # type: ignore[arg-type]


def write_config(directory: Path, config: dict | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))


@pytest.fixture
def make_ckpt(tmp_path: Path) -> Callable[..., Path]:
    """Write a toy checkpoint: ``make_ckpt(state, layout="new", shard_bytes=None, name="ckpt")``."""
    from avl.weights import save_sharded

    def make(
        state: dict[str, torch.Tensor],
        layout: str = "new",
        shard_bytes: int | None = None,
        name: str = "ckpt",
    ) -> Path:
        out = tmp_path / name
        save_sharded(to_layout(state, layout), out, shard_bytes or 1 << 40, config={"model_type": "toy"})
        return out

    return make


@pytest.fixture
def toy() -> SimpleNamespace:
    """The helpers above, for test modules (importlib import mode: conftest is not importable)."""
    return SimpleNamespace(
        Toy=Toy,
        KEYS=TOY_KEYS,
        to_layout=to_layout,
        random_state=random_state,
        meta_toy=meta_toy,
        write_config=write_config,
    )
