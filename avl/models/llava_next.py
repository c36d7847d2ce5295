"""LLaVA-1.6 / LLaVA-NeXT: LLaVA-1.5's tower, projector and decoder, with anyres image tiling.

Each image arrives as tiles [n_tiles, 3, 336, 336] (the whole image squashed to one base tile,
then a rows x cols grid of its best-fitting resolution; `avl.processing.anyres`). Every tile
goes through CLIP and the projector like a LLaVA-1.5 image. The image's features are then the
base tile's features, followed by the grid's features arranged as one map, with the rows (or
columns) that only cover the padding around the image cut off and the learned `image_newline`
vector appended at the end of each row. So the number of image tokens depends on the image's
size, and samples of one batch may have different counts.

With `feature_policy=VisionZip(...)` every tile (base and grid) keeps VisionZip's dominant +
contextual tokens, packed in the order of the release's LLaVA-NeXT path
(`avl.cache.visionzip.anyres_visionzip_tokens`), and the prompt is compacted to that count.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from avl.cache.layout import PromptLayout
from avl.cache.modal_cache import ModalCache
from avl.cache.policies import FeaturePolicy, Policy
from avl.cache.visionzip import VisionZip, anyres_visionzip_tokens
from avl.models.config import require
from avl.models.llava import LLAVA_KEY_MAP, Llava, LlavaConfig
from avl.processing.anyres import (
    DEFAULT_GRID_PINPOINTS,
    Size,
    check_grid_pinpoints,
    check_image_size,
    grid_shape,
    num_image_tokens,
    num_tiles,
    unpadded_window,
)

# LLaVA's table plus the newline vector: `image_newline` (llava-hf layout, kept as is) and
# `model.image_newline` (transformers 4.52-4.57 layout).
LLAVA_NEXT_KEY_MAP = (("model.image_newline", "image_newline"), *LLAVA_KEY_MAP)

# transformers' MistralConfig default, in force when a Mistral text_config omits the field
MISTRAL_SLIDING_WINDOW = 4096


@dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    """A LLaVA-NeXT `config.json` (model_type "llava_next").

    image_grid_pinpoints: the anyres grid resolutions, (height, width), multiples of the vision
    tile. image_seq_length: the base tile's token count (informational). sliding_window: a
    Mistral text model's attention window; avl runs full attention, which is the same as long
    as prompt + generated tokens fit in the window (checked in `prefill`).
    """

    image_grid_pinpoints: tuple[Size, ...] = DEFAULT_GRID_PINPOINTS
    image_seq_length: int = 576
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # "full" keeps CLS per tile, which the tile grid cannot be arranged with (transformers fails too)
        require(self.vision_feature_select_strategy == "default", "vision_feature_select_strategy",
                self.vision_feature_select_strategy, ["default"])
        object.__setattr__(self, "image_grid_pinpoints",
                           check_grid_pinpoints(self.image_grid_pinpoints, self.vision.image_size))
        require(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window >= 1),
                "text_config.sliding_window", self.sliding_window, "None or an int >= 1")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlavaNextConfig:
        text = raw.get("text_config") or {}
        text_type = text.get("model_type", "llama")
        require(text_type in ("llama", "mistral"), "text_config.model_type", text_type, ["llama", "mistral"])
        base = LlavaConfig.from_dict(raw)
        sliding = text.get("sliding_window", MISTRAL_SLIDING_WINDOW) if text_type == "mistral" else None
        return cls(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig)},
            image_grid_pinpoints=_or_default(raw.get("image_grid_pinpoints"), DEFAULT_GRID_PINPOINTS),
            image_seq_length=_or_default(raw.get("image_seq_length"), 576),
            sliding_window=sliding,
        )


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def grid_feature_map(grid: Tensor, rows: int, cols: int, side: int) -> Tensor:
    """The grid tiles' features [rows * cols, side * side, C] (tiles row by row, patches row by row
    in each) -> one feature map [rows * side, cols * side, C] of the whole grid."""
    grid = grid.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4)  # [rows, side, cols, side, C]
    return grid.reshape(rows * side, cols * side, -1)


def unpad_feature_map(feature_map: Tensor, image_size: Size) -> Tensor:
    """A grid's feature map [H, W, C] -> the part [h, w, C] that covers the image of (height,
    width) `image_size`, without the padding rows or columns (`unpadded_window`)."""
    r0, r1, c0, c1 = unpadded_window(image_size, (feature_map.shape[0], feature_map.shape[1]))
    return feature_map[r0:r1, c0:c1]


def rows_with_newline(feature_map: Tensor, newline: Tensor) -> Tensor:
    """A feature map [h, w, C] -> its rows in order, each followed by `newline` [C]: [h * (w + 1), C]."""
    ends = newline.to(feature_map.dtype).expand(feature_map.shape[0], 1, -1)  # [h, 1, C]
    return torch.cat([feature_map, ends], dim=1).flatten(0, 1)


def tiled_image_sizes(pixel_values: Tensor, image_sizes: Tensor | Sequence[Size] | None, channels: int, side: int,
                      processor: str) -> list[Size]:
    """Check tiled `pixel_values` [N_images, tiles, channels, side, side] and `image_sizes` [N_images, 2]
    (height, width), as the anyres image processor named `processor` returns them; the sizes as ints."""
    if pixel_values.dim() != 5 or pixel_values.shape[2:] != (channels, side, side):
        raise ValueError(
            f"pixel_values must be [N_images, tiles, {channels}, {side}, {side}] ({processor}'s layout), "
            f"got shape {tuple(pixel_values.shape)}"
        )
    n_images = pixel_values.shape[0]
    if image_sizes is None:
        raise ValueError(
            f"image_sizes is required with pixel_values: [{n_images}, 2], the (height, width) of each original "
            f"image, as {processor} returns it"
        )
    sizes_t = torch.as_tensor(image_sizes)
    if sizes_t.shape != (n_images, 2) or sizes_t.is_floating_point() or sizes_t.is_complex():
        raise ValueError(
            f"image_sizes must be an integer tensor [{n_images}, 2] (height, width) for the {n_images} image(s) "
            f"of pixel_values, got {sizes_t.dtype} shape {tuple(sizes_t.shape)}"
        )
    return [check_image_size(size) for size in sizes_t.tolist()]


def check_tile_counts(sizes: Sequence[Size], needed: Sequence[int], n_tiles: int, rule: str) -> None:
    """Each image i needs `needed[i]` of the `n_tiles` tiles per image of pixel_values (`rule` says which)."""
    for i, (size, count) in enumerate(zip(sizes, needed)):
        if count > n_tiles:
            raise ValueError(
                f"image {i} of size {size} (height, width) needs {count} tiles ({rule}) but pixel_values has "
                f"{n_tiles} tiles per image"
            )


def check_image_tokens(image_mask: Tensor, lengths: Sequence[int], sizes: Sequence[Size], image_token: int,
                       processor: str) -> None:
    """Each sample's image tokens (`image_mask` [B, L]) must be exactly the features of whole images, in
    order; `lengths` are the images' feature counts, `processor` the processor that expands them."""
    per_sample = image_mask.sum(-1).tolist()
    n_tokens, n_features = sum(per_sample), sum(lengths)
    if n_tokens != n_features:
        raise ValueError(
            f"the prompt has {n_tokens} image tokens (id {image_token}) but {len(lengths)} image(s) give "
            f"{n_features} features (per image: {list(lengths)}, sizes {list(sizes)}): expand each image placeholder "
            f"to its own image's count ({processor} does)"
        )
    ends = {0, *itertools.accumulate(lengths)}  # feature index after each whole image
    done = 0
    for b, n in enumerate(per_sample):
        done += n
        if done not in ends:
            raise ValueError(
                f"sample {b}'s image tokens end at image feature {done}, inside an image: the images in order "
                f"give {list(lengths)} features each, so the samples' image-token counts {per_sample} do not split "
                "them into whole images"
            )


def reexpand_images(input_ids: Tensor, attention_mask: Tensor, image_token: int, lengths: Sequence[int],
                    new_lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The prompt [B, L] (left-padded) with image i's `lengths[i]` consecutive image tokens (images in
    order through the batch) replaced by `new_lengths[i]` of them: (input_ids, attention_mask [B, L']),
    left-padded with id 0."""
    rows, image = [], 0
    for ids, valid in zip(input_ids.tolist(), attention_mask.bool().tolist()):
        tokens, row, i = [t for t, v in zip(ids, valid) if v], [], 0
        while i < len(tokens):
            if tokens[i] != image_token:
                row.append(tokens[i])
                i += 1
                continue
            if tokens[i:i + lengths[image]] != [image_token] * lengths[image]:
                raise ValueError(f"image {image}'s {lengths[image]} image tokens are not consecutive in its sample's "
                                 "prompt; allowed: each image's tokens in one run")
            row += [image_token] * new_lengths[image]
            i += lengths[image]
            image += 1
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=attention_mask.dtype,
                        device=attention_mask.device)
    return ids, mask


class LlavaNext(Llava):
    """LLaVA-NeXT (llava-hf layout). `prefill` takes `image_sizes` [N_images, 2] (height, width)."""

    key_map = LLAVA_NEXT_KEY_MAP

    def __init__(self, cfg: LlavaNextConfig) -> None:
        super().__init__(cfg)
        self.config: LlavaNextConfig = cfg
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))

    def num_image_tokens(self, image_size: Size) -> int:
        """Image tokens of an image of (height, width) `image_size`."""
        vision = self.config.vision
        return num_image_tokens(image_size, self.config.image_grid_pinpoints, vision.image_size, vision.patch_size)

    def num_tiles(self, image_size: Size) -> int:
        """Tiles of an image of (height, width) `image_size`, the base tile included."""
        return num_tiles(image_size, self.config.image_grid_pinpoints, self.config.vision.image_size)

    def packed_image_features(self, pixel_values: Tensor, image_sizes: Sequence[Size]) -> list[Tensor]:
        """pixel_values [N, T, 3, S, S] (zero tiles after each image's own) -> per image [n_i, C_text]."""
        counts = [self.num_tiles(size) for size in image_sizes]
        tiles = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts)])  # [sum n_i, 3, S, S]
        features = self.image_features(tiles)  # [sum n_i, P, C]
        return [self.pack(f, size) for f, size in zip(features.split(counts), image_sizes)]

    def pack(self, tile_features: Tensor, image_size: Size) -> Tensor:
        """One image's tile features [n_tiles, P, C] -> its image tokens [n, C]: base tile, then the
        unpadded grid map row by row, each row followed by `image_newline`."""
        side = self.config.vision.image_size // self.config.vision.patch_size
        rows, cols = grid_shape(image_size, self.config.image_grid_pinpoints, self.config.vision.image_size)
        base, grid = tile_features[0], tile_features[1:]  # [P, C], [rows * cols, P, C]
        grid = unpad_feature_map(grid_feature_map(grid, rows, cols, side), image_size)  # [h, w, C]
        return torch.cat([base, rows_with_newline(grid, self.image_newline)])  # [P + h * (w + 1), C]

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None, image_sizes: Tensor | Sequence[Size] | None = None,
              visionzip: VisionZip | None = None) -> tuple[Tensor, Tensor]:
        """Token embeddings with each image's features at its image-token positions, and that mask [B, L].
        With `visionzip`, an image's features are its VisionZip tokens (a `visionzip_prompt`'s count)."""
        image_mask = input_ids == self.config.image_token_index  # [B, L]
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None and image_sizes is not None:
            raise ValueError("image_sizes was given without pixel_values; pass both, or neither for a text-only prompt")
        sizes = [] if pixel_values is None else self._image_sizes(pixel_values, image_sizes)
        lengths = [self.num_image_tokens(size) if visionzip is None else self.visionzip_tokens(size, visionzip)
                   for size in sizes]
        self._check_image_tokens(image_mask, lengths, sizes)
        if sizes:
            packed = (self.packed_image_features(pixel_values, sizes) if visionzip is None
                      else self.visionzip_features(pixel_values, sizes, visionzip))
            embeds = embeds.masked_scatter(image_mask[..., None], torch.cat(packed).to(embeds.dtype))  # [sum n_i, C]
        return embeds, image_mask

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, policy: Policy,
                new_tokens: int, feature_policy: FeaturePolicy | None = None, *,
                image_sizes: Tensor | Sequence[Size] | None = None) -> tuple[Tensor, ModalCache]:
        """Run the prompt: next-token logits [B, V] and the compacted cache.

        pixel_values [N_images, T, 3, S, S] and image_sizes [N_images, 2] (height, width) as
        `LlavaNextImageProcessor` returns them, images in the order of their tokens in the batch.
        """
        visionzip = feature_policy if isinstance(feature_policy, VisionZip) else None
        if visionzip is not None:
            feature_policy = None  # applied here, before the language model
            if pixel_values is not None:
                input_ids, attention_mask = self.visionzip_prompt(input_ids, attention_mask, pixel_values, image_sizes,
                                                                  visionzip)
        self._check_sliding_window(attention_mask, new_tokens + 1)  # tokens generated: the decode steps + 1
        embeds, image_mask = self.embed(input_ids, pixel_values, image_sizes, visionzip)
        layout = PromptLayout.from_prompt(image_mask, attention_mask)
        return self.language_model.prefill(embeds, layout, policy, new_tokens, feature_policy=feature_policy)

    def visionzip_features(self, pixel_values: Tensor, image_sizes: Sequence[Size],
                           visionzip: VisionZip) -> list[Tensor]:
        """Each image's VisionZip tokens [n_tiles * (dominant + contextual), C_text]: every tile's
        selection (CLIP layer `visionzip.layer`), projected, packed as the release packs them."""
        counts = [self.num_tiles(size) for size in image_sizes]
        tiles = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, counts)])  # [sum n_i, 3, S, S]
        hidden, attention = self.vision_tower(tiles, visionzip.layer, cls_attention=True)
        selection = visionzip.select(hidden, attention)
        features = self.multi_modal_projector(selection.features)  # [sum n_i, D + C, C_text]
        side = self.config.vision.image_size // self.config.vision.patch_size
        grids = [grid_shape(size, self.config.image_grid_pinpoints, self.config.vision.image_size)
                 for size in image_sizes]
        return [anyres_visionzip_tokens(f, d, rows, cols, side) for f, d, (rows, cols) in
                zip(features.split(counts), selection.dominant.split(counts), grids)]

    def visionzip_prompt(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
                         image_sizes: Tensor | Sequence[Size] | None, visionzip: VisionZip) -> tuple[Tensor, Tensor]:
        """The prompt with each image's placeholder rows (its full anyres count, as the processor
        expands them) replaced by one row per VisionZip token, `n_tiles * (dominant + contextual)`:
        (input_ids, attention_mask [B, L']), left-padded, positions then contiguous as in the release."""
        sizes = self._image_sizes(pixel_values, image_sizes)
        lengths = [self.num_image_tokens(size) for size in sizes]
        self._check_image_tokens(input_ids == self.config.image_token_index, lengths, sizes)
        return reexpand_images(input_ids, attention_mask, self.config.image_token_index, lengths,
                               [self.visionzip_tokens(size, visionzip) for size in sizes])

    def visionzip_tokens(self, image_size: Size, visionzip: VisionZip) -> int:
        """Image tokens of an image of (height, width) `image_size` under VisionZip: dominant + contextual per tile."""
        return self.num_tiles(image_size) * (visionzip.dominant + visionzip.contextual)

    def _image_sizes(self, pixel_values: Tensor, image_sizes: Tensor | Sequence[Size] | None) -> list[Size]:
        """Check pixel_values against image_sizes; the sizes as (height, width) ints."""
        vision = self.config.vision
        sizes = tiled_image_sizes(pixel_values, image_sizes, vision.num_channels, vision.image_size,
                                  "LlavaNextImageProcessor")
        check_tile_counts(sizes, [self.num_tiles(size) for size in sizes], pixel_values.shape[1],
                          "1 base + the grid of its best resolution")
        return sizes

    def _check_image_tokens(self, image_mask: Tensor, lengths: list[int], sizes: list[Size]) -> None:
        check_image_tokens(image_mask, lengths, sizes, self.config.image_token_index, "LlavaNextProcessor")

    def _check_sliding_window(self, attention_mask: Tensor, new_tokens: int) -> None:
        window = self.config.sliding_window
        if window is None:
            return
        longest = int(attention_mask.sum(-1).max()) + new_tokens
        if longest > window:
            raise ValueError(
                f"prompt ({longest - new_tokens} tokens) + new tokens ({new_tokens}) = {longest} exceeds the text "
                f"model's sliding_window={window}; avl attends over the full sequence, which equals sliding-window "
                "attention only within the window"
            )
