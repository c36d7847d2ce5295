"""LLaVA-OneVision: SigLIP tower -> LLaVA's GELU projector -> anyres_max_9 packing -> Qwen2 decoder.

Each image arrives as tiles [n_tiles, 3, S, S] (`avl.processing.llava_onevision`): a base tile
(the whole image squashed) and the grid of its best resolution, or a single padded square tile
when it shares its prompt with other images (`batch_num_images`). Every tile goes through SigLIP
(hidden state `vision_feature_layer`, all patches: no class token) and the projector. An image's
features are then the base tile's, followed by the grid as one feature map with the padding rows
(or columns) cut off as in LLaVA-NeXT, bilinearly downsampled when it holds more than
anyres_max_N tiles' worth (`downsampled_size`), and `image_newline` after each row. A single-tile
image is its tile's features and one `image_newline`.

The language model is Qwen2: Llama's blocks with biases on q, k and v (`LlamaModel`, `qkv_bias`).
`forward` is the dense, cache-free reference (all logits of a left-padded batch); the policy-driven
`prefill` / `decode` go through the shared decoder loop (`CachedDecoder`) like the other families,
with every image-token row (newline features included) an image row of the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl.cache.layout import PromptLayout
from avl.cache.modal_cache import DecodeStep, ModalCache
from avl.cache.policies import FeaturePolicy, Policy
from avl.cache.visionzip import VisionZip
from avl.models.config import require
from avl.models.layers import prefill_attention
from avl.models.llama import LlamaConfig, LlamaModel
from avl.models.llava import LlavaConfig, Projector
from avl.models.llava_next import (
    LLAVA_NEXT_KEY_MAP,
    check_image_tokens,
    check_tile_counts,
    grid_feature_map,
    rows_with_newline,
    tiled_image_sizes,
    unpad_feature_map,
)
from avl.models.siglip import SiglipVisionConfig, SiglipVisionTower
from avl.processing.anyres import Size, check_grid_pinpoints, grid_shape
from avl.processing.llava_onevision import (
    DEFAULT_ASPECT_RATIO,
    ONEVISION_GRID_PINPOINTS,
    downsampled_size,
    max_tiles_of,
    multi_image_flags,
    onevision_num_image_tokens,
    onevision_num_tiles,
)
from avl.weights import KeyMap

# LLaVA-NeXT's table (llava-hf hub layout `language_model.model.*`, `vision_tower.vision_model.*`,
# `image_newline`; transformers 4.52-4.57's `model.*`; transformers 5 saves `vision_tower.embeddings.*`,
# our names). SigLIP's post_layernorm and pooling head act after the layer OneVision reads: dropped.
LLAVA_ONEVISION_KEY_MAP = KeyMap(
    LLAVA_NEXT_KEY_MAP, ignore=(r"^(model\.)?vision_tower\.(vision_model\.)?(post_layernorm|head)\.",)
)

# transformers' LlavaOnevisionConfig vision_config defaults (SigLIP so400m/14 at 384 px, 26 layers, no head)
ONEVISION_VISION_DEFAULTS: dict[str, Any] = dict(hidden_size=1152, intermediate_size=4304, patch_size=14,
                                                 image_size=384, num_hidden_layers=26, num_attention_heads=16,
                                                 vision_use_head=False)
# transformers' Qwen2Config defaults where they differ from LlamaConfig's
QWEN2_DEFAULTS: dict[str, Any] = dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768)


@dataclass(frozen=True)
class LlavaOnevisionConfig(LlavaConfig):
    """A LLaVA-OneVision `config.json` (model_type "llava_onevision"), transformers' defaults.

    image_grid_pinpoints: the anyres grid resolutions, (height, width), multiples of the tile.
    vision_aspect_ratio: "anyres_max_N", the tile budget of the packed grid map.
    Only `vision_feature_select_strategy="full"` (SigLIP has no class token) and one
    `vision_feature_layer` are supported.
    """

    vision: SiglipVisionConfig
    image_token_index: int = 151646
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"
    image_grid_pinpoints: tuple[Size, ...] = ONEVISION_GRID_PINPOINTS
    vision_aspect_ratio: str = DEFAULT_ASPECT_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.vision_feature_select_strategy == "full", "vision_feature_select_strategy",
                self.vision_feature_select_strategy, ["full"])
        object.__setattr__(self, "image_grid_pinpoints",
                           check_grid_pinpoints(self.image_grid_pinpoints, self.vision.image_size))
        max_tiles_of(self.vision_aspect_ratio)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlavaOnevisionConfig:
        vision = dict(raw.get("vision_config") or {})
        text = dict(raw.get("text_config") or {})
        vision_type, text_type = vision.get("model_type", "siglip_vision_model"), text.get("model_type", "qwen2")
        require(vision_type == "siglip_vision_model", "vision_config.model_type", vision_type, ["siglip_vision_model"])
        require(text_type == "qwen2", "text_config.model_type", text_type, ["qwen2"])
        require(not text.get("use_sliding_window", False), "text_config.use_sliding_window",
                text.get("use_sliding_window"), [False])
        # transformers ties the LM head when either the model's or the text model's flag says so
        tie = bool(raw.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text_cfg = LlamaConfig.from_dict({**QWEN2_DEFAULTS, **text, "tie_word_embeddings": tie, "qkv_bias": True})
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return cls(
            vision=SiglipVisionConfig.from_dict({**ONEVISION_VISION_DEFAULTS, **vision}),
            text=text_cfg,
            **{name: raw[name] if raw.get(name) is not None else value for name, value in defaults.items()
               if name != "image_token_index"},
            image_token_index=raw.get("image_token_index", raw.get("image_token_id", defaults["image_token_index"])),
        )

    @property
    def image_tokens_per_image(self) -> int:
        """Features of one tile (SigLIP's patches; there is no class token)."""
        return self.vision.num_patches

    @property
    def max_tiles(self) -> int:
        """N of `vision_aspect_ratio` "anyres_max_N"."""
        return max_tiles_of(self.vision_aspect_ratio)


class LlavaOnevision(nn.Module):
    """LLaVA-OneVision (llava-hf layout). `forward` and `prefill` take transformers' processor outputs
    (`input_ids`, `attention_mask`, `pixel_values` [N, tiles, 3, S, S], `image_sizes` [N, 2],
    `batch_num_images`); `prefill` / `decode` are the entry points `avl.generate` uses."""

    key_map = LLAVA_ONEVISION_KEY_MAP

    def __init__(self, cfg: LlavaOnevisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))
        self.language_model = LlamaModel(cfg.text)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters a checkpoint may omit because they are tied to another one."""
        if self.config.text.tie_word_embeddings:
            return {"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
        return {}

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def check_policy(self, policy: Policy, feature_policy: FeaturePolicy | None) -> None:
        """Raise if the policies cannot run on this model; VisionZip cannot (SigLIP has no [CLS] token)."""
        if isinstance(feature_policy, VisionZip):
            raise ValueError(f"feature_policy={feature_policy!r} cannot run on LLaVA-OneVision: VisionZip ranks an "
                             "image's patches by the attention of the vision tower's [CLS] token, and SigLIP has none "
                             "(the release, dvlab-research/VisionZip, has a CLIP rule only); allowed: LLaVA-1.5 and "
                             "LLaVA-NeXT (CLIP towers)")
        self.language_model.check_policy(policy, feature_policy)

    @property
    def max_positions(self) -> int:
        """The longest sequence (prompt + generated tokens) the Qwen2 rotary table is configured for."""
        return self.config.text.max_position_embeddings

    def num_image_tokens(self, image_size: Size, multi_image: bool = False) -> int:
        """Image tokens of an image of (height, width) `image_size` (one of several in its prompt: `multi_image`)."""
        cfg = self.config
        return onevision_num_image_tokens(image_size, cfg.image_grid_pinpoints, cfg.vision.image_size,
                                          cfg.vision.patch_size, cfg.max_tiles, multi_image)

    def num_tiles(self, image_size: Size, multi_image: bool = False) -> int:
        """Tiles of an image of (height, width) `image_size`: 1 when `multi_image`, else 1 base + its grid."""
        return onevision_num_tiles(image_size, self.config.image_grid_pinpoints, self.config.vision.image_size,
                                   multi_image)

    def image_features(self, tiles: Tensor) -> Tensor:
        """tiles [n, 3, S, S] -> projected features [n, P, C_text] of hidden state `vision_feature_layer`."""
        return self.multi_modal_projector(self.vision_tower(tiles, self.config.vision_feature_layer).hidden)

    def packed_image_features(self, pixel_values: Tensor, image_sizes: Sequence[Size],
                              batch_num_images: Sequence[int] | Tensor | None = None) -> list[Tensor]:
        """pixel_values [N, T, 3, S, S] (zero tiles after each image's own) -> per image [n_i, C_text].

        `batch_num_images` (images per prompt, as the image processor returns it; None: one each)
        marks the images of multi-image prompts, which use their first tile only.
        """
        multi = multi_image_flags(batch_num_images, len(image_sizes))
        counts = [self.num_tiles(size, m) for size, m in zip(image_sizes, multi)]
        tiles = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts)])  # [sum n_i, 3, S, S]
        features = self.image_features(tiles)  # [sum n_i, P, C]
        return [self.pack(f, size, m) for f, size, m in zip(features.split(counts), image_sizes, multi)]

    def pack(self, tile_features: Tensor, image_size: Size, multi_image: bool = False) -> Tensor:
        """One image's tile features [n_tiles, P, C] -> its image tokens [n, C] (module docstring)."""
        if multi_image:
            return torch.cat([tile_features[0], self.image_newline[None].to(tile_features.dtype)])  # [P + 1, C]
        vision = self.config.vision
        side = vision.patches_per_side
        rows, cols = grid_shape(image_size, self.config.image_grid_pinpoints, vision.image_size)
        base, grid = tile_features[0], tile_features[1:]  # [P, C], [rows * cols, P, C]
        grid = unpad_feature_map(grid_feature_map(grid, rows, cols, side), image_size)  # [h, w, C]
        height, width = downsampled_size(grid.shape[0], grid.shape[1], side, self.config.max_tiles)
        if (height, width) != grid.shape[:2]:
            grid = F.interpolate(grid.permute(2, 0, 1)[None], size=(height, width), mode="bilinear")[0].permute(1, 2, 0)
        return torch.cat([base, rows_with_newline(grid, self.image_newline)])  # [P + h * (w + 1), C]

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None, image_sizes: Tensor | Sequence[Size] | None = None,
              batch_num_images: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token embeddings with each image's features at its image-token positions, and that mask [B, L]."""
        cfg = self.config
        image_mask = input_ids == cfg.image_token_index  # [B, L]
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            if image_sizes is not None or batch_num_images is not None:
                raise ValueError("image_sizes / batch_num_images were given without pixel_values; pass them together, "
                                 "or none of them for a text-only prompt")
            check_image_tokens(image_mask, [], [], cfg.image_token_index, "LlavaOnevisionProcessor")
            return embeds, image_mask
        sizes = tiled_image_sizes(pixel_values, image_sizes, cfg.vision.num_channels, cfg.vision.image_size,
                                  "LlavaOnevisionImageProcessor")
        multi = multi_image_flags(batch_num_images, len(sizes))
        check_tile_counts(sizes, [self.num_tiles(s, m) for s, m in zip(sizes, multi)], pixel_values.shape[1],
                          "1 base + the grid of its best resolution, or 1 in a multi-image prompt")
        lengths = [self.num_image_tokens(s, m) for s, m in zip(sizes, multi)]
        check_image_tokens(image_mask, lengths, sizes, cfg.image_token_index, "LlavaOnevisionProcessor")
        features = torch.cat(self.packed_image_features(pixel_values, sizes, batch_num_images)).to(embeds.dtype)
        return embeds.masked_scatter(image_mask[..., None], features), image_mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_sizes: Tensor | Sequence[Size] | None = None,
                batch_num_images: Sequence[int] | Tensor | None = None) -> Tensor:
        """Dense, cache-free forward of a left-padded batch: logits [B, L, V] at every position.

        Positions count the valid tokens (`cumsum(attention_mask) - 1`, as in generation);
        logits at padding positions are not meaningful.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        valid = attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        h, _ = self.embed(input_ids, pixel_values, image_sizes, batch_num_images)
        lm = self.language_model
        cos, sin = lm.rotary(positions, h.dtype)
        for layer in lm.layers:
            q, k, v = layer.self_attn.project(layer.input_layernorm(h), cos, sin)
            h = layer.finish(h, prefill_attention(q, k, v, valid, layer.self_attn.scale))
        return lm.lm_head(lm.norm(h))

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, policy: Policy,
                new_tokens: int, feature_policy: FeaturePolicy | None = None, *,
                image_sizes: Tensor | Sequence[Size] | None = None,
                batch_num_images: Sequence[int] | Tensor | None = None) -> tuple[Tensor, ModalCache]:
        """Run the prompt: next-token logits [B, V] and the compacted cache, sized for `new_tokens` decode steps.

        pixel_values [N_images, T, 3, S, S], image_sizes [N_images, 2] (height, width) and
        batch_num_images [B] as `LlavaOnevisionProcessor` returns them, images in the order of their
        tokens in the batch. The image rows the policy scores are all image-token rows, so an
        image's `image_newline` features count among its N_img.
        """
        embeds, image_mask = self.embed(input_ids, pixel_values, image_sizes, batch_num_images)
        layout = PromptLayout.from_prompt(image_mask, attention_mask)
        return self.language_model.prefill(embeds, layout, policy, new_tokens, feature_policy=feature_policy)

    def decode(self, token: Tensor, cache: ModalCache, step: DecodeStep | None = None) -> Tensor:
        """One decode step: token [B] -> logits [B, V]; updates the cache in place (`CachedDecoder.decode`)."""
        return self.language_model.decode(token, cache, step)
