"""LLaVA-1.5: CLIP vision tower -> two-layer GELU projector -> features at the image-token positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl.cache.layout import PromptLayout, packed_index
from avl.cache.modal_cache import DecodeStep, ModalCache
from avl.cache.policies import FeaturePolicy, Policy
from avl.cache.visionzip import VisionZip
from avl.models.clip import ClipVisionConfig, ClipVisionTower
from avl.models.config import require
from avl.models.llama import LlamaConfig, LlamaModel

# Checkpoint key prefix -> module prefix, first match wins: the llava-hf hub layout
# (`language_model.model.*`, `vision_tower.vision_model.*`) and the `model.*` layout of
# transformers 4.52-4.57. transformers 5 saves `vision_tower.embeddings...`, our own names.
LLAVA_KEY_MAP = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


@dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA `config.json` (model_type "llava")."""

    vision: ClipVisionConfig
    text: LlamaConfig
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True

    def __post_init__(self) -> None:
        require(self.vision_feature_select_strategy in ("default", "full"), "vision_feature_select_strategy",
                self.vision_feature_select_strategy, ["default", "full"])
        require(isinstance(self.vision_feature_layer, int), "vision_feature_layer", self.vision_feature_layer,
                "a single layer index (an int)")
        require(self.projector_hidden_act == "gelu", "projector_hidden_act", self.projector_hidden_act, ["gelu"])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlavaConfig:
        text = dict(raw.get("text_config") or {})
        text.setdefault("tie_word_embeddings", False)  # the hub's LLaVA checkpoints ship their own lm_head
        image_token = raw.get("image_token_index", raw.get("image_token_id", 32000))
        return cls(
            vision=ClipVisionConfig.from_dict(raw.get("vision_config") or {}),
            text=LlamaConfig.from_dict(text),
            image_token_index=image_token,
            projector_hidden_act=raw.get("projector_hidden_act", "gelu"),
            vision_feature_layer=raw.get("vision_feature_layer", -2),
            vision_feature_select_strategy=raw.get("vision_feature_select_strategy", "default"),
            multimodal_projector_bias=raw.get("multimodal_projector_bias", True),
        )

    @property
    def image_tokens_per_image(self) -> int:
        """Feature positions per image: the patches, plus CLS with the `full` strategy."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")


class Projector(nn.Module):
    def __init__(self, cfg: LlavaConfig) -> None:
        super().__init__()
        bias = cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size, bias=bias)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class Llava(nn.Module):
    """LLaVA-1.5 (llava-hf layout). `prefill` / `decode` are the entry points `avl.generate` uses."""

    key_map = LLAVA_KEY_MAP

    def __init__(self, cfg: LlavaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_tower = ClipVisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = LlamaModel(cfg.text)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters a checkpoint may omit because they are tied to another one."""
        if self.config.text.tie_word_embeddings:
            return {"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
        return {}

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] -> projected features [N, P, C_text]."""
        hidden = self.vision_tower(pixel_values, self.config.vision_feature_layer)
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        return self.multi_modal_projector(hidden)

    def check_image_tokens(self, image_mask: Tensor, pixel_values: Tensor | None) -> int:
        """Raise unless the prompt's image tokens (image_mask [B, L]) are one full expansion per image;
        returns the number of images."""
        n_slots = int(image_mask.sum())
        if pixel_values is not None:
            self.vision_tower.check_pixels(pixel_values)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        per_image = self.config.image_tokens_per_image
        if n_slots != n_images * per_image:
            raise ValueError(
                f"the prompt has {n_slots} image tokens (id {self.config.image_token_index}) but {n_images} image(s) "
                f"give {n_images * per_image} features ({per_image} per image): expand each image placeholder to "
                f"{per_image} image tokens, one per image"
            )
        return n_images

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> tuple[Tensor, Tensor]:
        """Token embeddings with image features written at the image-token positions, and that mask."""
        image_mask = input_ids == self.config.image_token_index  # [B, L]
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(image_mask, 0))
        n_images = self.check_image_tokens(image_mask, pixel_values)
        if n_images:
            features = self.image_features(pixel_values).to(embeds.dtype).flatten(0, 1)  # [N * P, C]
            embeds = embeds.masked_scatter(image_mask[..., None], features)
        return embeds, image_mask

    def check_policy(self, policy: Policy, feature_policy: FeaturePolicy | None) -> None:
        """Raise if the policies cannot run on this model; VisionZip is applied here, before the
        language model, so only the sequence policy goes on to it."""
        if isinstance(feature_policy, VisionZip):
            tokens = self.config.vision.num_patches + 1
            if feature_policy.dominant + feature_policy.contextual > tokens:
                raise ValueError(f"{feature_policy!r} keeps {feature_policy.dominant + feature_policy.contextual} "
                                 f"tokens of an image, which has {tokens} (CLS + patches); allowed: dominant + "
                                 f"contextual <= {tokens}")
            feature_policy = None
        self.language_model.check_policy(policy, feature_policy)

    def visionzip_prompt(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
                         visionzip: VisionZip) -> tuple[Tensor, Tensor, Tensor]:
        """The prompt compacted to VisionZip's tokens: (input_ids, attention_mask [B, L'], left-padded,
        and the projected features [N, dominant + contextual, C]). Each image keeps its first
        `dominant + contextual` placeholder rows; the others are dropped."""
        self.vision_tower.check_pixels(pixel_values)
        hidden, attention = self.vision_tower(pixel_values, visionzip.layer, cls_attention=True)
        features = self.multi_modal_projector(visionzip.select(hidden, attention).features)
        image = input_ids == self.config.image_token_index
        kept = features.shape[1]
        within = (image.long().cumsum(-1) - 1) % self.config.image_tokens_per_image  # row number inside its image
        index = packed_index(attention_mask.bool() & (~image | (within < kept)))  # [B, L']
        ids = input_ids.gather(1, index.clamp(min=0)).masked_fill(index < 0, 0)
        return ids, (index >= 0).long(), features

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, policy: Policy,
                new_tokens: int, feature_policy: FeaturePolicy | None = None) -> tuple[Tensor, ModalCache]:
        """Run the prompt: next-token logits [B, V] and the compacted cache, sized for `new_tokens` decode steps.
        With `feature_policy=VisionZip(...)` the prompt is first compacted to its tokens (`visionzip_prompt`)."""
        if isinstance(feature_policy, VisionZip) and pixel_values is not None:
            self.check_image_tokens(input_ids == self.config.image_token_index, pixel_values)
            input_ids, attention_mask, features = self.visionzip_prompt(input_ids, attention_mask, pixel_values,
                                                                        feature_policy)
            image_mask = input_ids == self.config.image_token_index
            embeds = self.language_model.embed_tokens(input_ids.masked_fill(image_mask, 0))
            embeds = embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype).flatten(0, 1))
        else:
            embeds, image_mask = self.embed(input_ids, pixel_values)
        if isinstance(feature_policy, VisionZip):
            feature_policy = None
        layout = PromptLayout.from_prompt(image_mask, attention_mask)
        return self.language_model.prefill(embeds, layout, policy, new_tokens, feature_policy=feature_policy)

    def decode(self, token: Tensor, cache: ModalCache, step: DecodeStep | None = None) -> Tensor:
        return self.language_model.decode(token, cache, step)

    @property
    def max_positions(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype
