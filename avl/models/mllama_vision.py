"""Llama-3.2-Vision image encoder: a tiled ViT with aspect-ratio embeddings.

An image arrives as up to `max_num_tiles` square tiles (the preprocessing picks a tile canvas,
resizes, pads and splits; `avl/processing/mllama.py`). Per tile: patch embedding, then a gated
pre-tile (aspect-ratio) embedding, a class token, the gated positional + tile-positional embedding
and `layernorm_pre`. The token axis is zero-padded to a multiple of 8, then

1. the local encoder (`transformer`, `num_hidden_layers` plain layers) runs over all tiles of an
   image jointly, keeping the outputs of `intermediate_layers_indices`;
2. `layernorm_post`, the gated post-tile embedding, and the global encoder
   (`global_transformer`, `num_global_layers` layers with tanh-gated residuals).

The output per token is the global encoder's state concatenated with the kept intermediate states
(`hidden_size * (1 + len(intermediate_layers_indices))` = `vision_output_dim`), padding removed:
[B, images, tiles, tokens_per_tile, vision_output_dim]. Parameter names follow the hub's layout
(`vision_model.*` of meta-llama/Llama-3.2-11B-Vision).

Attention mask (as published): a token is "masked" when it is a padding token (the multiple-of-8
padding) or lies in a padding tile; a pair (query, key) is blocked only when BOTH are masked, so
real tokens attend every token and padding tokens attend real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl.models.config import config_fields, require

DEFAULT_ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclass(frozen=True)
class MllamaVisionConfig:
    """The hub's `vision_config` of a Llama-3.2-Vision checkpoint (defaults: transformers' own).

    `supported_aspect_ratios` lists tile layouts (rows, columns); an image's `aspect_ratio_id` is
    its layout's 1-based index in this list (0 = no image).
    """

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = DEFAULT_ASPECT_RATIOS
    vision_output_dim: int = 7680
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "intermediate_layers_indices", tuple(int(i) for i in self.intermediate_layers_indices))
        object.__setattr__(self, "supported_aspect_ratios",
                           tuple((int(h), int(w)) for h, w in self.supported_aspect_ratios))
        require(isinstance(self.image_size, int) and isinstance(self.patch_size, int), "vision_config.image_size",
                (self.image_size, self.patch_size), "square images: int image_size and patch_size")
        require(self.hidden_size % self.attention_heads == 0, "vision_config.hidden_size", self.hidden_size,
                f"a multiple of attention_heads={self.attention_heads}")
        require(self.image_size % self.patch_size == 0, "vision_config.image_size", self.image_size,
                f"a multiple of patch_size={self.patch_size}")
        require(self.hidden_act == "gelu", "vision_config.hidden_act", self.hidden_act, ["gelu"])
        n = self.num_hidden_layers
        require(all(-n <= i < n for i in self.intermediate_layers_indices), "vision_config.intermediate_layers_indices",
                self.intermediate_layers_indices, f"layer indices in [{-n}, {n - 1}]")
        expected = self.hidden_size * (1 + len(self.intermediate_layers_indices))
        require(self.vision_output_dim == expected, "vision_config.vision_output_dim", self.vision_output_dim,
                f"hidden_size * (1 + len(intermediate_layers_indices)) = {expected}")
        require(all(1 <= h * w <= self.max_num_tiles for h, w in self.supported_aspect_ratios),
                "vision_config.supported_aspect_ratios", self.supported_aspect_ratios,
                f"(rows, columns) layouts of 1 to max_num_tiles={self.max_num_tiles} tiles")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MllamaVisionConfig:
        fields = config_fields(cls, raw)
        if "attention_heads" not in fields and raw.get("num_attention_heads") is not None:
            fields["attention_heads"] = raw["num_attention_heads"]  # transformers' alias
        return cls(**fields)

    @property
    def tokens_per_tile(self) -> int:
        """Patches of one tile plus its class token: (image_size / patch_size)^2 + 1 (1601 at 560 / 14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_tokens_per_tile(self) -> int:
        """`tokens_per_tile` rounded up to a multiple of 8, the length the encoders run on."""
        return -(-self.tokens_per_tile // 8) * 8


class AspectRatioEmbedding(nn.Module):
    """Gated per-tile embedding looked up by the image's aspect-ratio id (pre- and post-tile)."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """x [N, T, S, C], aspect_ratio_ids [N] -> x plus one vector per tile."""
        per_tile = self.embedding(aspect_ratio_ids).view(-1, self.tiles, 1, self.dim)  # [N, T, 1, C]
        return x + per_tile * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """Per-token position embedding, blended by a tanh gate with a per-aspect-ratio tile-position table."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.tiles, self.tokens, self.dim = cfg.max_num_tiles, cfg.tokens_per_tile, cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(cfg.tokens_per_tile, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1,
                                           cfg.max_num_tiles * cfg.tokens_per_tile * cfg.hidden_size)

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """x [N, T, P+1, C], aspect_ratio_ids [N]."""
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.tokens, self.dim)
        tile_positions = self.tile_embedding(aspect_ratio_ids).view(-1, self.tiles, self.tokens, self.dim)
        return x + gate * tile_positions


class VisionAttention(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.heads = cfg.attention_heads
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x [N, S, C], allowed [N, 1, S, S] (True = may attend) -> [N, S, C]."""
        n, s, _ = x.shape
        q, k, v = (p(x).view(n, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [N, H, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(n, s, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm ViT layer; the global encoder's layers scale both residual branches by tanh gates."""

    def __init__(self, cfg: MllamaVisionConfig, gated: bool) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), allowed)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * mlp if self.gated else mlp)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, gated) for _ in range(num_layers))

    def forward(self, x: Tensor, allowed: Tensor, keep: tuple[int, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        """Run every layer; also return the outputs of the layers numbered in `keep` (0-based), in that order."""
        wanted = [i % len(self.layers) for i in keep]
        kept: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed)
            if i in wanted:
                kept[i] = x
        return x, [kept[i] for i in wanted]


def tile_attention_mask(tile_valid: Tensor, tokens: int, padded: int) -> Tensor:
    """tile_valid [N, T] -> allowed [N, 1, T*S, T*S] over the padded token axis (S = `padded`).

    A token is masked if it is padding (index >= `tokens` in its tile) or in a padding tile;
    a pair is blocked only when both tokens are masked (the published rule)."""
    real = torch.arange(padded, device=tile_valid.device) < tokens  # [S]
    unmasked = (tile_valid[:, :, None] & real).flatten(1)  # [N, T*S]
    return (unmasked[:, :, None] | unmasked[:, None, :])[:, None]


class MllamaVisionModel(nn.Module):
    """The tiled vision encoder; `forward` returns per-token features [B, I, T, P+1, vision_output_dim]."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, dim, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.gated_positional_embedding = GatedPositionalEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(dim)  # default eps (1e-5), as published
        self.layernorm_post = nn.LayerNorm(dim)
        self.transformer = VisionEncoder(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True)

    def embed(self, pixel_values: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """pixel_values [N, T, 3, H, W], aspect_ratio_ids [N] -> tile tokens [N, T, P+1, C] (class token first)."""
        n, tiles = pixel_values.shape[:2]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.flatten(0, 1).to(weight.dtype))  # [N*T, C, h, w]
        x = patches.flatten(2).transpose(1, 2).unflatten(0, (n, tiles))  # [N, T, P, C]
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        cls = self.class_embedding.expand(n, tiles, 1, -1)
        x = torch.cat([cls, x], dim=2)  # [N, T, P+1, C]
        return self.layernorm_pre(self.gated_positional_embedding(x, aspect_ratio_ids))

    def forward(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        """pixel_values [B, I, T, 3, H, W], aspect_ratio_ids [B, I], aspect_ratio_mask [B, I, T]
        -> features [B, I, T, P+1, vision_output_dim]."""
        cfg = self.config
        b, images, tiles = pixel_values.shape[:3]
        ids = aspect_ratio_ids.reshape(b * images)
        x = self.embed(pixel_values.flatten(0, 1), ids)  # [N, T, P+1, C]
        tokens, padded = cfg.tokens_per_tile, cfg.padded_tokens_per_tile
        x = F.pad(x, (0, 0, 0, padded - tokens))  # [N, T, S, C]
        allowed = tile_attention_mask(aspect_ratio_mask.reshape(b * images, tiles).bool(), tokens, padded)

        x, intermediate = self.transformer(x.flatten(1, 2), allowed, cfg.intermediate_layers_indices)  # [N, T*S, C]
        x = self.layernorm_post(x).unflatten(1, (tiles, padded))
        x = self.post_tile_positional_embedding(x, ids).flatten(1, 2)
        x, _ = self.global_transformer(x, allowed)  # [N, T*S, C]

        # intermediate states interleaved per channel (c0 of each kept layer, then c1, ...), as published
        stacked = torch.stack(intermediate, dim=-1).flatten(-2)  # [N, T*S, C*K]
        out = torch.cat([x, stacked], dim=-1).unflatten(1, (tiles, padded))[:, :, :tokens]  # [N, T, P+1, C*(K+1)]
        return out.unflatten(0, (b, images))
