"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT (`qwen2_vl_vision`) and a Qwen2 language model
with multimodal rotary positions (M-RoPE).

The two families differ only in the vision tower; the language model, the position rule and the
checkpoint layout are shared. Facts (transformers' `modeling_qwen2_vl.py` / `modeling_qwen2_5_vl.py`):

- Qwen2 decoder layer = the Llama layer with biases on q/k/v (not on o_proj);
- the image's features replace the `<|image_pad|>` tokens (id `image_token_id`), one per merge block;
- M-RoPE (`rope_index`): every token has a (t, h, w) position triple. Text tokens use (p, p, p)
  with p counting on from the previous segment; the k-th feature of an image with a merged grid
  (t, gh, gw) starting at position s gets (s + ti, s + hi, s + wi) for its row-major (ti, hi, wi),
  and the text after it continues at s + max(gh, gw) (images: t = 1). Padding is skipped (left
  padding does not shift positions). `rope_deltas = max(position) + 1 - valid length` per sample:
  a decode token at sequence index n (counting valid tokens only) has position n + delta on all
  three axes;
- the rotary frequencies are split into `mrope_section` chunks (sum = head_dim / 2); chunk i
  rotates by axis i % 3 of the triple (t, h, w, t, ...); both halves of the head use the same angles.

`Qwen2VL.forward` is a dense, cache-free prompt forward; `prefill` / `decode` run the policy-driven
cached decoder (`avl.models.decoder`), which `avl.generate` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from avl.cache.layout import PromptLayout
from avl.cache.modal_cache import DecodeStep, ModalCache
from avl.cache.policies import FeaturePolicy, Policy
from avl.models.config import config_fields, require
from avl.models.layers import prefill_attention
from avl.models.llama import LlamaConfig, LlamaModel
from avl.models.qwen2_vl_vision import (
    Qwen2VLVisionConfig,
    Qwen2VLVisionTower,
    Qwen25VLVisionConfig,
    VisionConfig,
    check_grid,
)

# Checkpoint key prefix -> module prefix, first match wins. The hub layout of Qwen/Qwen2-VL-*-Instruct
# and Qwen/Qwen2.5-VL-*-Instruct (also what transformers 5 writes): `visual.*`, `model.*` (the
# language model), `lm_head.*`; and transformers 4.52-4.57's `model.visual.*`, `model.language_model.*`.
QWEN2_VL_KEY_MAP = (
    ("model.visual.", "visual."),
    ("model.language_model.", "language_model."),
    ("model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
)

VISION_CONFIGS: dict[str, type[Qwen2VLVisionConfig] | type[Qwen25VLVisionConfig]] = {
    "qwen2_vl": Qwen2VLVisionConfig,
    "qwen2_5_vl": Qwen25VLVisionConfig,
}


@dataclass(frozen=True)
class Qwen2VLTextConfig(LlamaConfig):
    """The language model of Qwen2-VL / Qwen2.5-VL: a Qwen2 decoder (Llama layers, q/k/v biases) with
    M-RoPE sections. `head_dim` is always hidden_size // num_attention_heads (as in transformers)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    qkv_bias: bool = True  # Qwen2: biases on q/k/v, none on o_proj
    mrope_section: tuple[int, ...] = (16, 24, 24)
    use_sliding_window: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        require(self.hidden_size % self.num_attention_heads == 0, "text_config.num_attention_heads",
                self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size}")
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        super().__post_init__()
        require(len(self.mrope_section) == 3 and min(self.mrope_section) >= 0
                and sum(self.mrope_section) == self.head_dim // 2, "text_config.rope_parameters.mrope_section",
                self.mrope_section, f"three sizes (t, h, w) summing to head_dim / 2 = {self.head_dim // 2}")
        require(not self.use_sliding_window, "text_config.use_sliding_window", self.use_sliding_window,
                "False (sliding-window attention is not implemented, as in transformers' SDPA path)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen2VLTextConfig:
        """From a `text_config` dict (transformers >= 4.52) or the flat top level of older hub configs.

        Rotary settings come from `rope_parameters` (transformers 5) or `rope_scaling` (the hub's
        `{"type": "mrope", "mrope_section": [...]}`) and `rope_theta`.
        """
        fields = config_fields(cls, raw)
        for name in ("rope_scaling", "head_dim", "mrope_section", "rope_theta", "qkv_bias", "attention_bias"):
            fields.pop(name, None)
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        require(rope_type in ("default", "mrope"), "text_config.rope_parameters.rope_type", rope_type,
                ["default", "mrope"])
        if "mrope_section" in rope:
            fields["mrope_section"] = tuple(rope["mrope_section"])
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is not None:
            fields["rope_theta"] = float(theta)
        return cls(**fields)


@dataclass(frozen=True)
class Qwen2VLConfig:
    """A Qwen2-VL (model_type "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") `config.json`."""

    model_type: str
    vision: VisionConfig
    text: Qwen2VLTextConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self) -> None:
        require(self.model_type in VISION_CONFIGS, "model_type", self.model_type, sorted(VISION_CONFIGS))
        require(isinstance(self.vision, VISION_CONFIGS[self.model_type]), "vision_config", type(self.vision).__name__,
                VISION_CONFIGS[self.model_type].__name__)
        require(self.vision.out_dim == self.text.hidden_size, "vision_config output width", self.vision.out_dim,
                f"text hidden_size={self.text.hidden_size} (features are written into the token embeddings)")
        require(0 <= self.image_token_id < self.text.vocab_size, "image_token_id", self.image_token_id,
                f"an id in [0, vocab_size={self.text.vocab_size})")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen2VLConfig:
        model_type = raw.get("model_type")
        require(model_type in VISION_CONFIGS, "model_type", model_type, sorted(VISION_CONFIGS))
        text = dict(raw.get("text_config") or raw)  # older hub configs keep the text fields at the top level
        tie = raw.get("tie_word_embeddings")
        text["tie_word_embeddings"] = bool(tie if tie is not None else text.get("tie_word_embeddings", False))
        ids = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
               if raw.get(k) is not None}
        return cls(model_type=model_type, vision=VISION_CONFIGS[model_type].from_dict(raw.get("vision_config") or {}),
                   text=Qwen2VLTextConfig.from_dict(text), **ids)

    def image_tokens(self, image_grid_thw: Tensor) -> Tensor:
        """`<|image_pad|>` tokens (= features) per image: t * h * w / merge**2 -> [images]."""
        return image_grid_thw.prod(-1) // self.vision.spatial_merge_size**2


def rope_index(input_ids: Tensor, image_grid_thw: Tensor | None, attention_mask: Tensor | None, *,
               image_token_id: int, spatial_merge_size: int) -> tuple[Tensor, Tensor]:
    """M-RoPE positions of a (left-padded) prompt with images: `(position_ids [3, B, L], rope_deltas [B])`.

    Each maximal run of `image_token_id` is one image, taking the rows of `image_grid_thw` in order
    (sample by sample); its length must be t * h * w / merge**2. Padding (attention_mask 0) gets
    position 0 and is not counted. Images only: video positions (`second_per_grid_ts`,
    `tokens_per_second`) are not implemented.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if valid.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(valid.shape)}, input_ids {tuple(input_ids.shape)}")
    grids = [] if image_grid_thw is None else check_grid(image_grid_thw, spatial_merge_size)
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    deltas = []
    next_grid = 0
    for b in range(input_ids.shape[0]):
        is_image = (input_ids[b][valid[b]] == image_token_id).tolist()
        parts, start, i = [], 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                parts.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
            else:
                if next_grid >= len(grids):
                    raise ValueError(f"sample {b} has more image-token runs than image_grid_thw has rows "
                                     f"({len(grids)})")
                t, h, w = grids[next_grid]
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                if j - i != t * gh * gw:
                    raise ValueError(f"sample {b}: a run of {j - i} image tokens (id {image_token_id}) but image "
                                     f"{next_grid} with grid (t, h, w)={grids[next_grid]} has {t * gh * gw} features")
                grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
                parts.append(grid.flatten(1) + start)
                start += max(gh, gw)
                next_grid += 1
            i = j
        row = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, valid[b]] = row.to(positions.device)
        deltas.append((int(row.max()) + 1 if row.numel() else 0) - row.shape[1])
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompts hold {next_grid} image-token runs")
    return positions, torch.tensor(deltas, device=input_ids.device)


def mrope_cos_sin(positions: Tensor, head_dim: int, theta: float, section: tuple[int, ...],
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """M-RoPE tables for position triples [3, B, L] -> cos, sin [B, 1, L, head_dim].

    Frequency j (of head_dim / 2) rotates by the axis its `section` chunk names (t, h, w in turn);
    angles in float32, as transformers computes them.
    """
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    axis = torch.arange(len(section), device=device).remainder(3).repeat_interleave(
        torch.tensor(section, device=device))  # [head_dim / 2]
    angles = positions[axis].to(torch.float32).permute(1, 2, 0) * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Qwen2VLTextModel(LlamaModel):
    """The Qwen2 language model (llama.DecoderLayer with q/k/v biases) on the cached decoder.

    Prefill rotates by M-RoPE of `PromptLayout.rope_positions` (kept rows keep their triples when
    a policy drops image rows). A decode token has the same position on all three axes, where
    M-RoPE is the plain 1-D rotary (`rotary`, inherited), at the last prompt row's largest axis
    + 1 and one more per step: transformers' `rope_deltas` rule.
    """

    def mrope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, L, head_dim] for M-RoPE position triples [3, B, L]."""
        cfg = self.config
        return mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, dtype)

    def check_policy(self, policy: Policy, feature_policy: FeaturePolicy | None) -> None:
        """Refuses shifted positions: they re-rotate every cached key at its 1-D index inside the cache,
        which has no M-RoPE counterpart for the prompt's image rows (3-D positions)."""
        super().check_policy(policy, feature_policy)
        if policy.shifts_positions():
            raise ValueError(f"{policy!r}: shifted positions (StreamingLLM's pos_shift) re-rotate every cached key "
                             "at its 1-D index inside the cache, but Qwen2-VL rotates the prompt's image rows by "
                             "M-RoPE (3-D positions), which that rule does not define; use positions='original'")

    def prompt_rotary(self, layout: PromptLayout, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if layout.rope_positions is None:
            raise ValueError("Qwen2-VL's prompt layout needs rope_positions [3, B, L] (from rope_index)")
        return self.mrope(layout.rope_positions, dtype)

    def forward(self, h: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """Dense causal forward: embeddings [B, L, C], positions [3, B, L], valid [B, L] -> logits [B, L, V]."""
        cos, sin = self.mrope(positions, h.dtype)
        for layer in self.layers:
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            h = layer.finish(h, prefill_attention(q, k, v, valid, attn.scale))
        return self.lm_head(self.norm(h))


class Qwen2VL(nn.Module):
    """Qwen2-VL / Qwen2.5-VL (hub layout): `visual` tower and `language_model`.

    Inputs are transformers' processor outputs under its names: `input_ids`, `attention_mask`,
    `pixel_values [patches, C*T*P*P]`, `image_grid_thw [images, 3]`.
    """

    key_map = QWEN2_VL_KEY_MAP

    def __init__(self, cfg: Qwen2VLConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = Qwen2VLVisionTower(cfg.vision)
        self.language_model = Qwen2VLTextModel(cfg.text)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters a checkpoint may omit because they are tied to another one."""
        if self.config.text.tie_word_embeddings:
            return {"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
        return {}

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def set_reference_casts(self, enabled: bool = True) -> Qwen2VL:
        """Reproduce transformers' float32 islands in a float64 model: RMSNorm statistics and the
        vision rotary in float32. Only for parity with transformers in float64; float32 / bfloat16
        models compute those in float32 either way."""
        for module in self.modules():
            if hasattr(module, "island_dtype"):
                module.island_dtype = torch.float32 if enabled else None
        return self

    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Merged features of all images [sum(t*h*w) / merge**2, hidden], in placeholder order."""
        return self.visual(pixel_values, image_grid_thw)

    def rope_index(self, input_ids: Tensor, image_grid_thw: Tensor | None,
                   attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """`rope_index` with this checkpoint's image token and merge size."""
        return rope_index(input_ids, image_grid_thw, attention_mask, image_token_id=self.config.image_token_id,
                          spatial_merge_size=self.config.vision.spatial_merge_size)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """Token embeddings [B, L, C] with the image features written over the `<|image_pad|>` tokens."""
        if bool((input_ids == self.config.video_token_id).any()):
            raise ValueError(f"the prompts hold video tokens (id {self.config.video_token_id}); videos are not "
                             f"supported, only images")
        image_mask = input_ids == self.config.image_token_id
        embeds = self.language_model.embed_tokens(input_ids)
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together (both from the image processor)")
        n_slots = int(image_mask.sum())
        n_features = 0 if image_grid_thw is None else int(self.config.image_tokens(image_grid_thw).sum())
        if n_slots != n_features:
            raise ValueError(f"the prompts hold {n_slots} image tokens (id {self.config.image_token_id}) but "
                             f"image_grid_thw gives {n_features} features: expand each image placeholder to "
                             f"t * h * w / {self.config.vision.spatial_merge_size ** 2} tokens")
        if n_features:
            features = self.image_features(pixel_values, image_grid_thw).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_mask[..., None], features)
        return embeds

    def check_token_types(self, input_ids: Tensor, valid: Tensor, mm_token_type_ids: Tensor | None) -> None:
        """Raise unless `mm_token_type_ids` (the processor's, 1 on image tokens; None: not given)
        marks exactly the valid `<|image_pad|>` tokens (images are found by their id)."""
        if mm_token_type_ids is None:
            return
        expected = (input_ids == self.config.image_token_id) & valid
        if mm_token_type_ids.shape != input_ids.shape or not torch.equal(mm_token_type_ids.bool(), expected):
            raise ValueError(f"mm_token_type_ids does not mark exactly the image tokens (id "
                             f"{self.config.image_token_id}) of input_ids; videos are not supported")

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, policy: Policy,
                new_tokens: int, feature_policy: FeaturePolicy | None = None, *,
                image_grid_thw: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None) -> tuple[Tensor, ModalCache]:
        """Run the prompt: next-token logits [B, V] and the compacted cache, sized for `new_tokens` decode steps.

        Takes the processor's outputs by their names (`image_grid_thw`, `mm_token_type_ids`). Image
        rows (what image policies score, keep and drop) are the `<|image_pad|>` tokens; the vision
        start / end tokens around them are text.
        """
        self.check_token_types(input_ids, attention_mask.bool(), mm_token_type_ids)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        positions, _ = self.rope_index(input_ids, image_grid_thw, attention_mask)
        layout = PromptLayout.from_prompt(input_ids == self.config.image_token_id, attention_mask, positions)
        return self.language_model.prefill(embeds, layout, policy, new_tokens, feature_policy=feature_policy)

    def decode(self, token: Tensor, cache: ModalCache, step: DecodeStep | None = None) -> Tensor:
        return self.language_model.decode(token, cache, step)

    @property
    def max_positions(self) -> int:
        """`max_position_embeddings`; `generate` bounds prompt length + new tokens by it (M-RoPE
        positions never exceed the sequence index, so that is conservative)."""
        return self.config.text.max_position_embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, mm_token_type_ids: Tensor | None = None) -> Tensor:
        """Dense prompt forward (no cache): logits [B, L, V] of every position (left padding allowed).

        Takes the processor's outputs as they are; `mm_token_type_ids` (1 on image tokens), if
        given, must mark exactly the `<|image_pad|>` tokens (images are found by their id).
        """
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.check_token_types(input_ids, valid, mm_token_type_ids)
        positions, _ = self.rope_index(input_ids, image_grid_thw, valid)
        return self.language_model(self.embed(input_ids, pixel_values, image_grid_thw), positions, valid)


__all__ = ["QWEN2_VL_KEY_MAP", "Qwen2VL", "Qwen2VLConfig", "Qwen2VLTextConfig", "mrope_cos_sin", "rope_index"]
