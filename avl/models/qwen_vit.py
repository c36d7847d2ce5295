"""Qwen-VL's visual encoder: a ViT (no class token) and a one-layer cross-attention resampler.

pixels [N, 3, S, S] -> conv1 patches + positional table (resized to the grid) -> ln_pre -> pre-LN
blocks -> resampler (`n_queries` learned queries, 2-D sin-cos positions) -> ln_post -> @ proj ->
features [N, n_queries, output_dim], written over the `<img>...</img>` span of the prompt.

Module and parameter names follow the checkpoint (`transformer.visual.*` of Qwen/Qwen-VL-Chat), so
the key map only strips the `transformer.` prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl.models.config import config_fields, require
from avl.models.layers import compute_dtype

LAYER_NORM_EPS = 1e-6  # every visual LayerNorm (the original's partial(nn.LayerNorm, eps=1e-6))
RESAMPLER_HEAD_DIM = 128  # the resampler has output_dim // 128 heads


@dataclass(frozen=True)
class QwenVisualConfig:
    """The `visual` dict of a Qwen-VL `config.json` (keyword arguments of the original VisionTransformer)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    n_queries: int = 256
    output_dim: int = 4096
    image_start_id: int = 151857

    def __post_init__(self) -> None:
        require(self.image_size % self.patch_size == 0, "visual.image_size", self.image_size,
                f"a multiple of patch_size={self.patch_size}")
        require(self.width % self.heads == 0, "visual.width", self.width, f"a multiple of heads={self.heads}")
        require(math.isqrt(self.n_queries) ** 2 == self.n_queries, "visual.n_queries", self.n_queries,
                "a perfect square (the resampler's queries form a square grid)")
        require(self.output_dim >= RESAMPLER_HEAD_DIM and self.output_dim % self.resampler_heads == 0,
                "visual.output_dim", self.output_dim,
                f"a multiple of its head count output_dim // {RESAMPLER_HEAD_DIM} (at least {RESAMPLER_HEAD_DIM})")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenVisualConfig:
        return cls(**config_fields(cls, raw))

    @property
    def grid(self) -> int:
        """Patches per side at `image_size`."""
        return self.image_size // self.patch_size

    @property
    def resampler_heads(self) -> int:
        return max(self.output_dim // RESAMPLER_HEAD_DIM, 1)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


def resize_position_table(table: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """A position table [s*s, C] (an s x s grid, row-major) for a g x g grid, rows = g*g -> [g*g, C].

    When s != g the table is treated as an s x s image with C channels and resized with bicubic
    interpolation (align_corners=False) in `dtype`, then cast back (the original does this in
    float32, `get_abs_pos`).
    """
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(rows)
    if src == tgt:
        return table
    grid = table.to(dtype).reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, s, s]
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)  # [g*g, C]


def sincos_2d(dim: int, grid: int) -> Tensor:
    """MAE's 2-D sin-cos table [grid*grid, dim] (float32, as the original builds it in numpy).

    Only the initial value of the resampler's `pos_embed`; checkpoints hold the table itself.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # rows = y

    def embed(pos: Tensor) -> Tensor:  # [grid*grid] -> [grid*grid, dim/2]
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # the original's meshgrid puts w first, so its "h" half encodes x and its "w" half y
    return torch.cat([embed(xs), embed(ys)], dim=1)


class VisualAttention(nn.Module):
    """ViT self-attention. `in_proj` rows are interleaved PER HEAD: rows h*3*hd + [0:hd] are q_h,
    [hd:2hd] k_h, [2hd:3hd] v_h (not nn.MultiheadAttention's [Q; K; V] blocks)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, 3*hd]
        q, k, v = qkv.chunk(3, dim=-1)  # [B, H, N, hd] each
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd], scale 1/sqrt(hd), no mask
        return self.out_proj(out.transpose(1, 2).flatten(2))


class VisualBlock(nn.Module):
    """Pre-LN transformer block with an exact-GELU MLP (`c_fc`, `c_proj`)."""

    def __init__(self, cfg: QwenVisualConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(cfg.width, cfg.mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_width, cfg.width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PoolAttention(nn.Module):
    """nn.MultiheadAttention's parameters and math (packed [Q; K; V] `in_proj_weight`, heads
    contiguous), batch first, for queries and keys of different lengths."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """query [B, Q, E], key/value [B, N, E] -> [B, Q, E]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w, b).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, *, E/H]
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Q, E/H]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Resampler(nn.Module):
    """One cross-attention layer from `n_queries` learned queries to the ViT tokens.

    q = ln_q(query) + pos_embed (the n_queries-row table, not resized); k = ln_kv(kv_proj(x)) +
    pos_embed resized to the patch grid; v = ln_kv(kv_proj(x)) (no positions).
    """

    def __init__(self, cfg: QwenVisualConfig) -> None:
        super().__init__()
        dim, grid = cfg.output_dim, math.isqrt(cfg.n_queries)
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid), requires_grad=False)  # [n_queries, E]
        self.query = nn.Parameter(torch.zeros(cfg.n_queries, dim))
        self.kv_proj = nn.Linear(cfg.width, dim, bias=False) if cfg.width != dim else nn.Identity()
        self.attn = PoolAttention(dim, cfg.resampler_heads)
        self.ln_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor, table_dtype: torch.dtype) -> Tensor:
        """x [B, P, width] ViT tokens -> [B, n_queries, E]."""
        kv = self.ln_kv(self.kv_proj(x))  # [B, P, E]
        key_pos = resize_position_table(self.pos_embed, x.shape[1], table_dtype)  # [P, E]
        queries = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # [B, Q, E]
        return self.attn(queries, kv + key_pos, kv)


class QwenVisionTransformer(nn.Module):
    """The whole visual tower: `forward(pixels) -> features [N, n_queries, output_dim]`."""

    def __init__(self, cfg: QwenVisualConfig) -> None:
        super().__init__()
        self.config = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(256, cfg.width) * cfg.width**-0.5)  # a 16 x 16 grid
        self.ln_pre = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.layers))
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.randn(cfg.output_dim, cfg.output_dim) * cfg.output_dim**-0.5)  # [in, out]
        # dtype of the position-table resizing; None: at least float32 (float64 stays float64).
        # The original always resizes in float32 (`set_reference_casts` on the model sets that).
        self.island_dtype: torch.dtype | None = None

    def table_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.island_dtype or compute_dtype(dtype)

    def check_pixels(self, pixel_values: Tensor) -> None:
        """Square RGB images whose side is a multiple of the patch size (the grid must be square)."""
        patch = self.config.patch_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] != pixel_values.shape[3] \
                or pixel_values.shape[2] % patch:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected [images, 3, S, S] with S a multiple "
                f"of patch_size={patch} (the Qwen-VL transform gives S = image_size = {self.config.image_size})"
            )

    def patch_tokens(self, pixel_values: Tensor) -> Tensor:
        """pixels [N, 3, S, S] -> ViT tokens [N, (S/patch)^2, width] (after the blocks, before the resampler)."""
        self.check_pixels(pixel_values)
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [N, P, width]
        x = x + resize_position_table(self.positional_embedding, x.shape[1], self.table_dtype(x.dtype))
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return x

    def resample(self, tokens: Tensor) -> Tensor:
        """ViT tokens [N, P, width] -> features [N, n_queries, output_dim]."""
        x = self.attn_pool(tokens, self.table_dtype(tokens.dtype))
        return self.ln_post(x) @ self.proj

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.resample(self.patch_tokens(pixel_values))
