"""CLIP vision tower (ViT-L/14 in LLaVA), returning the hidden states of one chosen layer.

The encoder block (`ClipEncoderLayer`: pre-norm attention and MLP, the hub's names) is shared with
SigLIP (`avl.models.siglip`), whose config has the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl.models.config import config_fields, require
from avl.models.layers import compute_dtype


@dataclass(frozen=True)
class ClipVisionConfig:
    """The hub's `vision_config` of a CLIP vision model (field names as in `config.json`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        require(self.hidden_size % self.num_attention_heads == 0, "vision_config.hidden_size",
                self.hidden_size, f"a multiple of num_attention_heads={self.num_attention_heads}")
        require(self.image_size % self.patch_size == 0, "vision_config.image_size", self.image_size,
                f"a multiple of patch_size={self.patch_size}")
        require(self.hidden_act in ACTIVATIONS, "vision_config.hidden_act", self.hidden_act, sorted(ACTIVATIONS))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClipVisionConfig:
        return cls(**config_fields(cls, raw))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (transformers' "gelu_pytorch_tanh", SigLIP's activation)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh}


def hidden_state_index(layer: int, num_layers: int) -> int:
    """A `vision_feature_layer` (negative counts from the end, as transformers' `hidden_states`)
    as a hidden-state index in [0, num_layers]: 0 is the embedding output, i the output of layer i."""
    n = num_layers + 1
    require(isinstance(layer, int) and -n <= layer < n, "vision_feature_layer", layer, f"an int in [{-n}, {n - 1}]")
    return layer % n


@dataclass(frozen=True)
class ClsAttention:
    """What selecting tokens by the [CLS] attention of one encoder layer needs (VisionZip), taken
    from that layer's own attention as it runs."""

    probs: Tensor  # [N, H, 1 + P] attention of the [CLS] query over every token (CLS first), >= float32
    keys: Tensor  # [N, H, 1 + P, D] the layer's keys (k_proj of its normed input, bias included)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, return_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        """x [B, N, C] -> (output [B, N, C], attention probabilities [B, H, N, N] if `return_probs` else None).

        Without `return_probs` the fused SDPA kernel runs; with it the softmax is materialised,
        in at least float32 (`compute_dtype`), and the output is computed from those probabilities.
        """
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if not return_probs:
            out, probs = F.scaled_dot_product_attention(q, k, v), None  # [B, H, N, D]
        else:
            dtype = compute_dtype(q.dtype)
            scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2) * q.shape[-1] ** -0.5
            probs = scores.softmax(dim=-1)  # [B, H, N, N]
            out = (probs @ v.to(dtype)).to(v.dtype)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1)), probs


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: Tensor, return_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        """x [B, N, C] -> (x [B, N, C], this layer's attention probabilities [B, H, N, N] or None)."""
        attn, probs = self.self_attn(self.layer_norm1(x), return_probs)
        x = x + attn
        return x + self.mlp(self.layer_norm2(x)), probs


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [N, P, C]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipVisionTower(nn.Module):
    """CLIP ViT; `forward` returns the hidden states after `layer` ([N, 1 + P, C], CLS first).

    Hidden state 0 is the embedding output (after `pre_layrnorm`), hidden state i the output
    of encoder layer i; negative indices count from the end, as in transformers' `hidden_states`.
    Layers after the requested one are not run. `post_layernorm` is kept for checkpoint
    compatibility; LLaVA never applies it. With `cls_attention=True` it also returns the
    `ClsAttention` of the encoder layer whose output is returned (VisionZip's layer -2), computed
    in that same pass.
    """

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the hub's name
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def check_pixels(self, pixel_values: Tensor) -> None:
        """Raise ValueError unless pixel_values is [images, num_channels, image_size, image_size]."""
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [images, "
                             f"{', '.join(map(str, expected))}] (vision_config: num_channels={cfg.num_channels}, "
                             f"image_size={cfg.image_size}): preprocess with the checkpoint's image processor")

    def forward(self, pixel_values: Tensor, layer: int = -1,
                cls_attention: bool = False) -> Tensor | tuple[Tensor, ClsAttention]:
        """pixel_values [N, 3, S, S] -> hidden states [N, 1 + P, C] of `layer`; with `cls_attention`,
        also that layer's [CLS] attention row and keys, from the same pass (VisionZip)."""
        self.check_pixels(pixel_values)
        stop = hidden_state_index(layer, self.config.num_hidden_layers)
        if cls_attention:
            require(stop > 0, "layer", layer, "an encoder layer's output (not the embeddings) with cls_attention")
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        blocks = self.encoder["layers"][:stop]
        for block in blocks[:-1] if cls_attention else blocks:
            x, _ = block(x)
        if not cls_attention:
            return x
        # the last layer runs as usual (its output is unchanged); its [CLS] query and keys are projected
        # once more from the same normed input: one row of logits, not a second pass of the tower
        last = blocks[-1]
        attn = last.self_attn
        normed = last.layer_norm1(x)
        b, n, _ = x.shape
        query = attn.q_proj(normed[:, :1]).view(b, 1, attn.heads, -1).transpose(1, 2)  # [N, H, 1, D]
        keys = attn.k_proj(normed).view(b, n, attn.heads, -1).transpose(1, 2)  # [N, H, 1 + P, D]
        dtype = compute_dtype(query.dtype)
        logits = query.to(dtype) @ keys.to(dtype).transpose(-1, -2) * query.shape[-1] ** -0.5
        x, _ = last(x)
        return x, ClsAttention(torch.softmax(logits, dim=-1)[:, :, 0], keys)
