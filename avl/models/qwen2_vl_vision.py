"""The vision towers of Qwen2-VL and Qwen2.5-VL (native-resolution ViTs with 2-D rotary).

Input is what transformers' `Qwen2VLImageProcessor` returns: `pixel_values [sum(t*h*w), C*T*P*P]`,
one row per patch, patches of an image in merge-block order (each `merge x merge` block of
neighbouring patches is contiguous, blocks row-major), and `image_grid_thw [images, 3]` in patch
units. The tower:

1. patch embedding: a Conv3d with kernel = stride = (T, P, P), i.e. one linear map per patch row;
2. 2-D rotary (axial): a patch at grid row r, column c rotates the first half of each head's
   frequency pairs by r, the second half by c (head_dim / 4 frequencies, base `rope_theta`);
3. pre-norm blocks with bidirectional attention inside each frame of each image (never across
   images). Qwen2.5-VL attends inside windows of `window_size` pixels (in merged-token units
   `window_size // merge // patch` per side, edge windows smaller) except in the
   `fullatt_block_indexes` blocks, which attend over the whole frame. Windows are realised by
   reordering the merge blocks window by window before the blocks and undoing it after the merger;
4. PatchMerger: norm, then the `merge**2` patch rows of each block concatenated, GELU MLP ->
   features `[sum(t*h*w) / merge**2, out_dim]`, in the prompt's `<|image_pad|>` order.

Qwen2-VL: LayerNorm, `fc1 -> quick_gelu -> fc2` MLP of width `embed_dim * mlp_ratio`.
Qwen2.5-VL: RMSNorm, SwiGLU MLP with biases (`intermediate_size`), RMSNorm in the merger.
Module names follow the checkpoints (`visual.patch_embed.proj`, `visual.blocks.N.attn.qkv`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl.models.clip import quick_gelu
from avl.models.config import config_fields, require
from avl.models.layers import GatedMLP, RMSNorm, apply_rotary, compute_dtype

NORM_EPS = 1e-6  # every norm of both towers


def _vision_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Dataclass fields from a hub `vision_config`, accepting the original names (`in_chans`) and
    transformers >= 5's nested `rope_parameters`."""
    fields = config_fields(cls, raw)
    if "in_chans" in raw and "in_channels" not in fields:
        fields["in_channels"] = raw["in_chans"]
    theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        fields["rope_theta"] = theta
    return fields


def _check_geometry(cfg: Qwen2VLVisionConfig | Qwen25VLVisionConfig) -> None:
    require(cfg.width % cfg.num_heads == 0 and (cfg.width // cfg.num_heads) % 4 == 0, "vision_config.num_heads",
            cfg.num_heads, f"a divisor of the width {cfg.width} leaving a head_dim divisible by 4 (2-D rotary)")
    require(cfg.spatial_merge_size >= 1, "vision_config.spatial_merge_size", cfg.spatial_merge_size, "an integer >= 1")
    require(cfg.patch_size >= 1 and cfg.temporal_patch_size >= 1, "vision_config.patch_size",
            (cfg.patch_size, cfg.temporal_patch_size), "positive (patch_size, temporal_patch_size)")


@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The `vision_config` of a Qwen2-VL `config.json` (model_type "qwen2_vl")."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # the merger's output width = the language model's hidden size
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _check_geometry(self)
        require(self.hidden_act == "quick_gelu", "vision_config.hidden_act", self.hidden_act, ["quick_gelu"])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen2VLVisionConfig:
        return cls(**_vision_fields(cls, raw))

    @property
    def width(self) -> int:
        return self.embed_dim

    @property
    def out_dim(self) -> int:
        return self.hidden_size


@dataclass(frozen=True)
class Qwen25VLVisionConfig:
    """The `vision_config` of a Qwen2.5-VL `config.json` (model_type "qwen2_5_vl")."""

    depth: int = 32
    hidden_size: int = 1280  # the ViT width
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    out_hidden_size: int = 3584  # the merger's output width = the language model's hidden size
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: float = 4
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        _check_geometry(self)
        require(self.hidden_act == "silu", "vision_config.hidden_act", self.hidden_act, ["silu"])
        unit = self.spatial_merge_size * self.patch_size
        require(self.window_size >= unit and self.window_size % unit == 0, "vision_config.window_size",
                self.window_size, f"a positive multiple of spatial_merge_size * patch_size = {unit}")
        require(all(0 <= i < self.depth for i in self.fullatt_block_indexes), "vision_config.fullatt_block_indexes",
                self.fullatt_block_indexes, f"block indexes in [0, depth={self.depth})")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen25VLVisionConfig:
        return cls(**_vision_fields(cls, raw))

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def out_dim(self) -> int:
        return self.out_hidden_size

    @property
    def window_tokens(self) -> int:
        """Window side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size


VisionConfig = Qwen2VLVisionConfig | Qwen25VLVisionConfig


def check_grid(grid_thw: Tensor, merge: int) -> list[tuple[int, int, int]]:
    """`image_grid_thw [images, 3]` as Python ints, with h and w multiples of `merge`."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.is_floating_point():
        raise ValueError(f"image_grid_thw must be an integer tensor [images, 3] (t, h, w), got "
                         f"{grid_thw.dtype} {tuple(grid_thw.shape)}")
    grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    bad = [g for g in grids if min(g) < 1 or g[1] % merge or g[2] % merge]
    if bad:
        raise ValueError(f"image_grid_thw rows {bad} are invalid: t, h, w must be >= 1 and h, w multiples of "
                         f"spatial_merge_size={merge}")
    return grids


def patch_positions(grids: list[tuple[int, int, int]], merge: int, device: torch.device) -> Tensor:
    """(row, column) of every patch in the processor's merge-block order -> [sum(t*h*w), 2]."""
    out = []
    for t, h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()  # block row, block col, in-row, in-col
        cols = cols.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_rotary(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Axial rotary tables for patch positions [N, 2] -> cos, sin [N, head_dim] (angles in float32,
    as transformers computes them)."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, device=positions.device, dtype=torch.float32) / quarter))
    angles = (positions.to(torch.float32)[..., None] * inv_freq).flatten(1)  # [N, 2 * head_dim/4]: rows, then cols
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def frame_bounds(grids: list[tuple[int, int, int]], device: torch.device) -> Tensor:
    """Segment boundaries [frames + 1] of full attention: each frame of each image on its own."""
    lengths = torch.tensor([h * w for t, h, w in grids for _ in range(t)], device=device)
    return F.pad(lengths.cumsum(0), (1, 0))


def window_order(grids: list[tuple[int, int, int]], merge: int, window: int,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """Qwen2.5-VL's window reordering of the merge blocks and the windows' boundaries.

    Returns `order [blocks]`: the merge-block indices window by window (windows of `window x window`
    blocks tiling each frame from the top-left, row-major; blocks row-major inside a window), and
    `bounds [windows + 1]`: the windows' boundaries in patch rows of the reordered sequence.
    """
    order, lengths, start = [], [], 0
    for t, h, w in grids:
        bh, bw = h // merge, w // merge
        index = torch.arange(t * bh * bw, device=device).view(t, bh, bw) + start
        for frame in index:
            for top in range(0, bh, window):
                for left in range(0, bw, window):
                    cell = frame[top : top + window, left : left + window].flatten()
                    order.append(cell)
                    lengths.append(cell.numel() * merge * merge)
        start += t * bh * bw
    bounds = F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0))
    return torch.cat(order), bounds


def segment_attention(q: Tensor, k: Tensor, v: Tensor, bounds: Tensor, scale: float) -> Tensor:
    """Bidirectional attention inside each segment [bounds[i], bounds[i+1]) of the rows.

    q, k, v [N, H, D] -> [N, H, D]. Segments of one length are batched as they are; segments of
    different lengths are padded to the longest and the padding masked out of the keys.
    """
    lengths = bounds.diff()
    count, longest = lengths.numel(), int(lengths.max())
    if bool((lengths == longest).all()):
        qs, ks, vs = (x.view(count, longest, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # [S, H, L, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)
    segment = torch.repeat_interleave(torch.arange(count, device=q.device), lengths)  # [N]
    offset = torch.arange(q.shape[0], device=q.device) - bounds[:-1][segment]

    def pad(x: Tensor) -> Tensor:  # [N, H, D] -> [S, H, L, D]
        out = x.new_zeros(count, longest, *x.shape[1:])
        out[segment, offset] = x
        return out.transpose(1, 2)

    valid = torch.arange(longest, device=q.device) < lengths[:, None]  # [S, L]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[segment, offset]


class PatchEmbed(nn.Module):
    """Conv3d patch embedding (transformers' weight layout [width, C, T, P, P], no bias) applied to
    flattened patch rows [N, C*T*P*P]: with kernel = stride it is one linear map per row."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        weight = self.proj.weight
        if pixel_values.dim() != 2 or pixel_values.shape[1] != weight[0].numel():
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [patches, "
                             f"{weight[0].numel()}] (channels * temporal_patch_size * patch_size**2, the layout of "
                             f"Qwen2VLImageProcessor)")
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1))


class VisionAttention(nn.Module):
    """Fused `qkv` ([Q; K; V] blocks, heads contiguous, with bias), 2-D rotary on q and k, `proj`."""

    island_dtype: torch.dtype | None = None  # dtype of the rotation; None: at least float32

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bounds: Tensor) -> Tensor:
        """x [N, C], cos/sin [N, head_dim], segment bounds -> [N, C]."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, -1).unbind(1)  # [N, H, D] each
        rot = self.island_dtype or compute_dtype(x.dtype)
        q = apply_rotary(q.to(rot), cos[:, None].to(rot), sin[:, None].to(rot)).to(x.dtype)
        k = apply_rotary(k.to(rot), cos[:, None].to(rot), sin[:, None].to(rot)).to(x.dtype)
        return self.proj(segment_attention(q, k, v, bounds, self.scale).flatten(1))


class VisionMlp(nn.Module):
    """Qwen2-VL's block MLP: fc2(quick_gelu(fc1(x)))."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if isinstance(cfg, Qwen25VLVisionConfig):
            self.norm1, self.norm2 = RMSNorm(cfg.width, NORM_EPS), RMSNorm(cfg.width, NORM_EPS)
            self.mlp: nn.Module = GatedMLP(cfg.width, cfg.intermediate_size, bias=True)
        else:
            self.norm1, self.norm2 = nn.LayerNorm(cfg.width, eps=NORM_EPS), nn.LayerNorm(cfg.width, eps=NORM_EPS)
            self.mlp = VisionMlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.attn = VisionAttention(cfg.width, cfg.num_heads)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bounds: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate the `merge**2` patches of a block, then Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        merged = cfg.width * cfg.spatial_merge_size**2
        rms = isinstance(cfg, Qwen25VLVisionConfig)
        self.ln_q = RMSNorm(cfg.width, NORM_EPS) if rms else nn.LayerNorm(cfg.width, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x [N, width] -> [N / merge**2, out_dim]."""
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class Qwen2VLVisionTower(nn.Module):
    """Either family's tower: `forward(pixel_values, image_grid_thw) -> features [tokens, out_dim]`."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        cfg = self.config
        merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        grids = check_grid(image_grid_thw, merge)
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != patches:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw={grids} "
                             f"describes {patches} patch rows")
        x = self.patch_embed(pixel_values)
        device = x.device
        cos, sin = vision_rotary(patch_positions(grids, merge, device), cfg.width // cfg.num_heads, cfg.rope_theta,
                                 x.dtype)
        full = frame_bounds(grids, device)
        windows, order = full, None
        if isinstance(cfg, Qwen25VLVisionConfig):
            order, windows = window_order(grids, merge, cfg.window_tokens, device)
            x, cos, sin = (t.view(-1, unit, t.shape[-1])[order].flatten(0, 1) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            bounds = windows if isinstance(cfg, Qwen25VLVisionConfig) and i not in cfg.fullatt_block_indexes \
                else full
            x = block(x, cos, sin, bounds)
        features = self.merger(x)
        if order is not None:
            features = features[torch.argsort(order)]
        return features
