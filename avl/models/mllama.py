"""Llama-3.2-Vision (model_type "mllama"): tiled vision encoder -> projector -> a Llama text model whose
layers at `cross_attention_layers` cross-attend the image features instead of self-attending.

The image is not in the token sequence: a single `<|image|>` token marks where it was, and the
`cross_attention_mask` [B, L, images, tiles] says which text rows attend which image tiles. So the
cache has two parts:

- the self-attention layers' text KV: one `LayerCache` per self-attention layer, built and updated
  by the shared loop of `CachedDecoder`, so the text policies (Full, A-VL's text H2O, H2O,
  StreamingLLM) work unchanged;
- the cross-attention layers' image KV: one `CrossCache` (a `CrossLayerCache`) per cross-attention
  layer, at that layer's place in `ModalCache.layers`, computed once in prefill, read-only in
  decode. The `Trim` feature policy (Trimmed Llama) makes it shorter.

Cross-attention masking follows transformers' `MllamaForConditionalGeneration` (the parity
reference): a text row whose mask row is all zero ("fully masked", e.g. the tokens before the
image) attends every feature row the layer holds, unmasked, and the layer's MLP branch is zeroed
for it; its attention branch is kept. (Meta's reference code also zeroes the attention branch.)
Decode tokens use the last prompt row's mask, as transformers' `generate` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl.cache.layout import PromptLayout, packed_index
from avl.cache.modal_cache import CrossLayerCache, DecodeStep, ModalCache
from avl.cache.policies import FeaturePolicy, Policy
from avl.cache.trim import Trim, select_features
from avl.models.config import config_fields, require
from avl.models.decoder import CachedDecoder, CrossAttentionBlock, CrossObserver
from avl.models.layers import GatedMLP, RMSNorm, compute_dtype
from avl.models.llama import DecoderLayer, LlamaConfig
from avl.models.mllama_vision import MllamaVisionConfig, MllamaVisionModel

# Checkpoint key prefix -> module prefix, first match wins: the hub layout of
# meta-llama/Llama-3.2-11B-Vision (also what transformers 5 saves) and the `model.*` layout that
# transformers' MllamaForConditionalGeneration uses in memory.
MLLAMA_KEY_MAP = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)

DEFAULT_CROSS_ATTENTION_LAYERS = (3, 8, 13, 18, 23, 28, 33, 38)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class MllamaTextConfig:
    """The hub's `text_config` of a Llama-3.2-Vision checkpoint (defaults: transformers' own).

    `rope_scaling` holds the llama3 frequency-scaling parameters (`factor`, `low_freq_factor`,
    `high_freq_factor`, `original_max_position_embeddings`), or None for plain rotary; it is read
    from `rope_scaling` (hub) or `rope_parameters` (transformers >= 5).
    """

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    cross_attention_layers: tuple[int, ...] = DEFAULT_CROSS_ATTENTION_LAYERS
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cross_attention_layers", tuple(int(i) for i in self.cross_attention_layers))
        require(self.hidden_size % self.num_attention_heads == 0, "text_config.hidden_size", self.hidden_size,
                f"a multiple of num_attention_heads={self.num_attention_heads}")
        require(self.num_attention_heads % self.num_key_value_heads == 0, "text_config.num_key_value_heads",
                self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        require(self.hidden_act == "silu", "text_config.hidden_act", self.hidden_act, ["silu"])
        layers = self.cross_attention_layers
        require(len(set(layers)) == len(layers) and all(0 <= i < self.num_hidden_layers for i in layers),
                "text_config.cross_attention_layers", layers,
                f"distinct layer indices in [0, {self.num_hidden_layers - 1}]")
        require(len(layers) < self.num_hidden_layers, "text_config.cross_attention_layers", layers,
                "at least one self-attention layer")
        require(not self.tie_word_embeddings, "text_config.tie_word_embeddings", self.tie_word_embeddings,
                "False (the embedding has vocab_size + 8 rows, the LM head vocab_size)")
        if self.rope_scaling is not None:
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            require(not missing, "text_config.rope_scaling", self.rope_scaling,
                    f"llama3 parameters {list(LLAMA3_ROPE_KEYS)}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MllamaTextConfig:
        fields = config_fields(cls, raw)
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        require(rope_type in ("default", "llama3"), "text_config.rope_scaling", rope, "rope_type 'default' or 'llama3'")
        if rope.get("rope_theta") is not None and raw.get("rope_theta") is None:
            fields["rope_theta"] = rope["rope_theta"]
        fields["rope_scaling"] = {k: rope.get(k) for k in LLAMA3_ROPE_KEYS} if rope_type == "llama3" else None
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.cross_attention_layers)

    def llama(self) -> LlamaConfig:
        """The config of a self-attention layer, as our Llama blocks take it."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta)


@dataclass(frozen=True)
class MllamaConfig:
    """A Llama-3.2-Vision `config.json` (model_type "mllama")."""

    vision: MllamaVisionConfig
    text: MllamaTextConfig
    image_token_index: int = 128256

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MllamaConfig:
        return cls(
            vision=MllamaVisionConfig.from_dict(raw.get("vision_config") or {}),
            text=MllamaTextConfig.from_dict(raw.get("text_config") or {}),
            image_token_index=raw.get("image_token_index", raw.get("image_token_id", 128256)),
        )


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict | None, device: torch.device | None = None) -> Tensor:
    """Rotary inverse frequencies [head_dim / 2] (float32), with Llama 3.1's long-context rescaling.

    Wavelengths above `original_max_position_embeddings / low_freq_factor` are slowed by `factor`,
    those below `... / high_freq_factor` are kept, and the band between is interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(middle, blended, scaled)


class CrossAttention(nn.Module):
    """Text queries over image-feature keys/values; q and k are RMS-normalised per head."""

    def __init__(self, cfg: MllamaTextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def query(self, x: Tensor) -> Tensor:
        """x [B, L, C] -> q [B, Hq, L, D]."""
        b, n, _ = x.shape
        return self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2))

    def keys_values(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, N, C] -> k, v [B, Hkv, N, D]."""
        b, n, _ = features.shape
        k = self.k_proj(features).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(features).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def output(self, out: Tensor) -> Tensor:
        """out [B, Hq, L, D] -> [B, L, C]."""
        return self.o_proj(out.transpose(1, 2).flatten(2))


class CrossAttentionLayer(CrossAttentionBlock):
    """Cross-attention block with tanh-gated residual branches (attention, then MLP)."""

    def __init__(self, cfg: MllamaTextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def finish(self, h: Tensor, attn_out: Tensor, row_on: Tensor) -> Tensor:
        """h [B, L, C], attn_out [B, Hq, L, D], row_on [B, L] (row attends some image) -> h."""
        h = h + self.cross_attn_attn_gate.tanh() * self.cross_attn.output(attn_out)
        mlp = self.mlp(self.post_attention_layernorm(h)) * row_on[..., None].to(h.dtype)
        return h + self.cross_attn_mlp_gate.tanh() * mlp

    def prefill(self, h: Tensor, layout: PromptLayout, image: ImageContext, feature_policy: FeaturePolicy | None,
                observe: CrossObserver | None = None) -> tuple[Tensor, ImageContext, CrossCache]:
        """The prompt over the image context. With a trimming `feature_policy` (the loop passes it to the
        first cross-attention layer only), score the features from this layer's probabilities and return
        the trimmed context for all later layers; this layer's own prompt output still uses every
        feature, its cache only the kept ones. `observe` gets the last prompt row's probabilities over
        the context's slots, and the cache keeps it for the decode steps."""
        attn = self.cross_attn
        q = attn.query(self.input_layernorm(h))  # [B, Hq, L, D]
        k, v = attn.keys_values(image.features)  # [B, Hkv, N, D]
        allowed, row_on = image.allowed, image.row_on
        h = self.finish(h, cross_attention(q, k, v, allowed, attn.scale), row_on)
        if observe is not None:
            observe(allowed[:, -1], cross_attention_probs(q[:, :, -1:], k, allowed[:, -1:], attn.scale)[:, :, 0])
        if not isinstance(feature_policy, Trim) or not feature_policy.trims:
            return h, image, image.cache(k, v, observe)
        voters = scoring_rows(image, layout)  # [B, L]
        probs = cross_attention_probs(q, k, allowed, attn.scale) * voters[:, None, :, None]  # [B, Hq, L, N]
        kept = select_features(probs, image.present & image.held, feature_policy.keep, feature_policy.criterion)
        index = packed_index(kept, min_width=1)  # [B, K]
        trimmed = image.select(index)
        safe = index.clamp(min=0)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        return h, trimmed, trimmed.cache(k.gather(2, safe), v.gather(2, safe), observe)

    def decode(self, h: Tensor, cache: CrossCache) -> Tensor:
        """h [B, 1, C] over the layer's cached image K/V (static shapes, no data-dependent control flow)."""
        q = self.cross_attn.query(self.input_layernorm(h))  # [B, Hq, 1, D]
        out = cross_attention(q, cache.k, cache.v, cache.decode_allowed[:, None], self.cross_attn.scale)
        if cache.observer is not None:
            probs = cross_attention_probs(q, cache.k, cache.decode_allowed[:, None], self.cross_attn.scale)
            cache.observer(cache.decode_allowed, probs[:, :, 0])
        return self.finish(h, out, cache.decode_row_on[:, None])


def cross_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Grouped-query attention of text rows over feature rows, without repeating K/V.

    q [B, Hq, L, D], k/v [B, Hkv, N, D], allowed [B, L, N] (every row allows at least one key)
    -> out [B, Hq, L, D]. The Hq / Hkv query heads of a group share one K/V head, so they are
    folded into the query axis.
    """
    b, hq, length, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    groups = hq // hkv
    q = q.reshape(b, hkv, groups * length, d)  # head h = kv * groups + g
    mask = allowed[:, None, None].expand(b, 1, groups, length, n).reshape(b, 1, groups * length, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).view(b, hq, length, d)


def cross_attention_probs(q: Tensor, k: Tensor, allowed: Tensor, scale: float, chunk: int = 256) -> Tensor:
    """Attention probabilities [B, Hq, L, N] (at least float32) of every query row; rows chunked."""
    groups = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(groups, dim=1).to(compute_dtype(k.dtype))
    out = []
    for start in range(0, q.shape[2], chunk):
        scores = torch.einsum("bhld,bhnd->bhln", q[:, :, start:start + chunk].to(keys.dtype), keys) * scale
        scores = scores.masked_fill(~allowed[:, None, start:start + chunk], float("-inf"))
        out.append(torch.softmax(scores, dim=-1))
    return torch.cat(out, dim=2)


@dataclass
class CrossCache(CrossLayerCache):
    """A cross-attention layer's image K/V plus what a decode step needs to attend it.

    Slots hold feature rows in a fixed order; after trimming, `rows` says which original feature
    row each slot holds (-1 = empty slot of a sample with fewer kept rows).
    """

    rows: Tensor  # [B, N'] original feature row of each slot, -1 = empty
    decode_allowed: Tensor  # [B, N'] slots a decode token attends
    decode_row_on: Tensor  # [B] the decode token attends some image (else its MLP branch is zeroed)
    # when set, called with (decode_allowed, probs [B, Hq, N']) after each step's attention: eager runs only
    observer: CrossObserver | None = field(default=None, repr=False, compare=False)


@dataclass
class ImageContext:
    """What the cross-attention layers of one prefill attend: features and masks, possibly trimmed."""

    features: Tensor  # [B, N, C] projected vision features (the K/V input)
    text_mask: Tensor  # [B, L, N] prompt row may attend feature row (cross_attention_mask, per feature row)
    held: Tensor  # [B, N] slot holds a feature row (all True untrimmed; the kept rows after trimming)
    present: Tensor  # [B, N] slot holds a real feature row (not a padding tile or padding image)
    rows: Tensor  # [B, N] original feature row index of each slot, -1 = empty
    full_rows: Tensor  # [B] real feature rows before trimming

    @property
    def row_on(self) -> Tensor:
        """[B, L]: the row attends some held feature row (transformers' full-text-row mask)."""
        return (self.text_mask & self.held[:, None]).any(-1)

    @property
    def allowed(self) -> Tensor:
        """[B, L, N]: a row's mask, or every held row for a fully masked row. A sample with no held row
        (no image left) attends its empty slots, whose zero features give a zero output."""
        allowed = (self.text_mask | ~self.row_on[..., None]) & self.held[:, None]
        return allowed | ~self.held.any(-1)[:, None, None]

    def select(self, index: Tensor) -> ImageContext:
        """The context of the slots `index` [B, K] (-1 = empty slot)."""
        held = index >= 0
        safe = index.clamp(min=0)
        features = self.features.gather(1, safe[..., None].expand(-1, -1, self.features.shape[-1]))
        text_mask = self.text_mask.gather(2, safe[:, None].expand(-1, self.text_mask.shape[1], -1)) & held[:, None]
        return ImageContext(
            features=features.masked_fill(~held[..., None], 0.0),
            text_mask=text_mask,
            held=held,
            present=self.present.gather(1, safe) & held,
            rows=torch.where(held, self.rows.gather(1, safe), -1),
            full_rows=self.full_rows,
        )

    def cache(self, k: Tensor, v: Tensor, observer: CrossObserver | None = None) -> CrossCache:
        """The layer's cache of K/V [B, Hkv, N, D] over these slots; decode uses the last prompt row's mask."""
        return CrossCache(k=k, v=v, valid=self.present & self.held, full_rows=self.full_rows, rows=self.rows,
                          decode_allowed=self.allowed[:, -1], decode_row_on=self.row_on[:, -1], observer=observer)


def scoring_rows(image: ImageContext, layout: PromptLayout) -> Tensor:
    """[B, L]: the text queries that vote in Trim's scoring: prompt rows that may attend some image row."""
    return layout.valid & image.row_on


class MllamaTextModel(CachedDecoder):
    """The Llama text model with interleaved cross-attention layers, and its policy-driven prefill/decode.

    `layers[i]` is a `CrossAttentionLayer` for i in `cross_attention_layers`, else a Llama
    `DecoderLayer`. The embedding has `vocab_size + 8` rows (the `<|image|>` id is `vocab_size`).
    """

    def __init__(self, cfg: MllamaTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size)
        llama = cfg.llama()
        self.layers = nn.ModuleList(
            CrossAttentionLayer(cfg) if i in cfg.cross_attention_layers else DecoderLayer(llama)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, L, D] for positions [B, L] (computed in float32, then cast)."""
        inv_freq = llama3_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling,
                                   positions.device)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def check_policy(self, policy: Policy, feature_policy: FeaturePolicy | None) -> None:
        """Text policies run on the self-attention layers; the image is in the cross-attention layers,
        so policies that select or drop image rows of the sequence do not apply."""
        if feature_policy is not None and not isinstance(feature_policy, Trim):
            raise ValueError(f"feature_policy={feature_policy!r} is not supported by Llama-3.2-Vision; allowed: Trim")
        if feature_policy is not None and not self.config.cross_attention_layers:
            raise ValueError(f"feature_policy={feature_policy!r} trims the image features of cross-attention layers, "
                             "but this model has none (text_config.cross_attention_layers is empty)")
        n_self = len(self.config.self_attention_layers)
        if policy.selects_image_rows():
            raise ValueError(
                f"{policy!r} selects image rows of the sequence (secondary/core), but Llama-3.2-Vision keeps its image "
                "in the cross-attention layers: use feature_policy=Trim(keep=...) to shrink the image part of the cache"
            )
        if any(policy.prune_keep(i) is not None for i in range(len(self.layers))):
            raise ValueError(
                f"{policy!r} drops image hidden states after a prefill layer (FastV / A-VL's P), which needs image rows "
                "in the sequence; Llama-3.2-Vision has none (its image is in the cross-attention layers): use "
                "feature_policy=Trim(keep=...) for the image part of the cache"
            )
        policy.check_layers(n_self)


class Mllama(nn.Module):
    """Llama-3.2-Vision (hub layout). `prefill` / `decode` are the entry points of `avl.generate`.

    Inputs as transformers' `MllamaProcessor` returns them: input_ids / attention_mask [B, L]
    (left-padded), pixel_values [B, I, T, 3, H, W] (T = max_num_tiles, zero tiles as padding),
    aspect_ratio_ids [B, I] (0 = no image), aspect_ratio_mask [B, I, T] and
    cross_attention_mask [B, L, I, T].
    """

    key_map = MLLAMA_KEY_MAP

    def __init__(self, cfg: MllamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_model = MllamaVisionModel(cfg.vision)
        self.multi_modal_projector = nn.Linear(cfg.vision.vision_output_dim, cfg.text.hidden_size)
        self.language_model = MllamaTextModel(cfg.text)

    @property
    def tied_weights(self) -> dict[str, str]:
        """None: the LM head is never tied (the embedding has 8 extra rows)."""
        return {}

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def image_features(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        """-> projected features [B, I * T * (P+1), C_text] (image-major, then tile, then token)."""
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # [B, I, T, P+1, Cv]
        return self.multi_modal_projector(features).flatten(1, 3)

    def image_context(self, input_ids: Tensor, pixel_values: Tensor, aspect_ratio_ids: Tensor | None,
                      aspect_ratio_mask: Tensor | None, cross_attention_mask: Tensor | None) -> ImageContext:
        """Validate the image inputs and run the vision side: the untrimmed `ImageContext`."""
        self._check_image_inputs(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        per_tile = self.config.vision.tokens_per_tile
        features = self.image_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask).to(self.dtype)
        b, n = features.shape[:2]
        tiles = aspect_ratio_mask.bool() & (aspect_ratio_ids > 0)[..., None]  # [B, I, T]
        present = tiles.repeat_interleave(per_tile, dim=-1).flatten(1)  # [B, N]
        text_mask = cross_attention_mask.bool().repeat_interleave(per_tile, dim=-1).flatten(2)  # [B, L, N]
        rows = torch.arange(n, device=features.device).expand(b, n)
        return ImageContext(features, text_mask, torch.ones_like(present), present, rows, present.sum(-1))

    def _check_image_inputs(self, input_ids: Tensor, pixel_values: Tensor, aspect_ratio_ids: Tensor | None,
                            aspect_ratio_mask: Tensor | None, cross_attention_mask: Tensor | None) -> None:
        cfg = self.config.vision
        b, length = input_ids.shape
        for name, value in (("aspect_ratio_ids", aspect_ratio_ids), ("aspect_ratio_mask", aspect_ratio_mask),
                            ("cross_attention_mask", cross_attention_mask)):
            if value is None:
                raise ValueError(f"{name} is required with pixel_values (MllamaProcessor returns it)")
        if pixel_values.dim() != 6 or pixel_values.shape[0] != b:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [batch={b}, images, "
                             f"tiles={cfg.max_num_tiles}, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]")
        images, tiles = pixel_values.shape[1:3]
        if tiles != cfg.max_num_tiles:
            raise ValueError(f"pixel_values has {tiles} tiles per image, but this model takes exactly max_num_tiles="
                             f"{cfg.max_num_tiles} (pad with zero tiles and mark them 0 in aspect_ratio_mask)")
        if tuple(pixel_values.shape[3:]) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values tiles have shape {tuple(pixel_values.shape[3:])}; expected "
                             f"({cfg.num_channels}, {cfg.image_size}, {cfg.image_size})")
        if tuple(aspect_ratio_ids.shape) != (b, images):
            raise ValueError(f"aspect_ratio_ids has shape {tuple(aspect_ratio_ids.shape)}; expected {(b, images)}")
        if tuple(aspect_ratio_mask.shape) != (b, images, tiles):
            raise ValueError(f"aspect_ratio_mask has shape {tuple(aspect_ratio_mask.shape)}; expected "
                             f"{(b, images, tiles)}")
        if tuple(cross_attention_mask.shape) != (b, length, images, tiles):
            raise ValueError(f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}; expected "
                             f"[batch, length, images, tiles] = {(b, length, images, tiles)}")
        n_ratios = len(cfg.supported_aspect_ratios)
        if bool(((aspect_ratio_ids < 0) | (aspect_ratio_ids > n_ratios)).any()):
            raise ValueError(f"aspect_ratio_ids holds {aspect_ratio_ids.tolist()}; allowed: 1..{n_ratios} "
                             f"(supported_aspect_ratios) or 0 for no image")
        layout_tiles = torch.tensor([0] + [h * w for h, w in cfg.supported_aspect_ratios],
                                    device=aspect_ratio_ids.device)
        used = aspect_ratio_mask.bool().sum(-1)  # [B, I]
        expected = layout_tiles[aspect_ratio_ids]
        real = aspect_ratio_ids > 0
        if bool((real & (used != expected)).any()) or not bool(aspect_ratio_mask[..., 0].bool().all()):
            raise ValueError(f"aspect_ratio_mask marks {used.tolist()} tiles per image, but the aspect ratios of "
                             f"aspect_ratio_ids give {torch.where(real, expected, 0).tolist()} (tile 0 is always 1)")
        placeholders = (input_ids == self.config.image_token_index).sum(-1)  # [B]
        if bool((real.sum(-1) != placeholders).any()):
            raise ValueError(f"the prompts have {placeholders.tolist()} <|image|> token(s) (id "
                             f"{self.config.image_token_index}) per sample but {real.sum(-1).tolist()} image(s): "
                             "give one image per <|image|> token")

    def _check_text_only(self, image_mask: Tensor, feature_policy: FeaturePolicy | None,
                         *image_inputs: Tensor | None) -> None:
        if any(x is not None for x in image_inputs):
            raise ValueError("aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask need pixel_values")
        if bool(image_mask.any()):
            raise ValueError(f"the prompts have {image_mask.sum(-1).tolist()} <|image|> token(s) (id "
                             f"{self.config.image_token_index}) per sample but no pixel_values were given")
        if isinstance(feature_policy, Trim) and feature_policy.trims:
            raise ValueError(f"feature_policy={feature_policy!r} trims image features, but no pixel_values were given")

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, policy: Policy,
                new_tokens: int, feature_policy: FeaturePolicy | None = None, *, aspect_ratio_ids: Tensor | None = None,
                aspect_ratio_mask: Tensor | None = None, cross_attention_mask: Tensor | None = None,
                ) -> tuple[Tensor, ModalCache]:
        """Run the prompt: next-token logits [B, V] and the cache (text KV per self-attention layer,
        image KV per cross-attention layer, `cache.cross`; none without images), sized for `new_tokens`
        decode steps. `feature_policy`: `Trim` (or None: every feature)."""
        image_mask = input_ids == self.config.image_token_index
        image = None
        if pixel_values is not None:
            image = self.image_context(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                                       cross_attention_mask)
        else:
            self._check_text_only(image_mask, feature_policy, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        layout = PromptLayout.from_prompt(image_mask, attention_mask)
        embeds = self.language_model.embed_tokens(input_ids)
        return self.language_model.prefill(embeds, layout, policy, new_tokens, image, feature_policy)

    def decode(self, token: Tensor, cache: ModalCache, step: DecodeStep | None = None) -> Tensor:
        return self.language_model.decode(token, cache, step)

    @property
    def max_positions(self) -> int:
        return self.config.text.max_position_embeddings
