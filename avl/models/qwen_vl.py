"""Qwen-VL / Qwen-VL-Chat (the original 2023 model): Qwen LM + ViT + resampler.

The visual features replace the hidden states strictly between each `<img>` (id
`visual.image_start_id`) and `</img>` (that id + 1), whatever ids those positions hold; `<img>`
and `</img>` keep their embeddings. The language model is a `CachedDecoder`, so every cache
policy runs on it unchanged. Qwen specifics:

- fused `c_attn` ([Q | K | V] blocks, heads contiguous, with bias), `c_proj` without bias;
- SwiGLU MLP `c_proj(w1(x) * silu(w2(x)))`: w2 is the gated branch, each of width
  intermediate_size // 2;
- rotary (NeoX halves) on the first `rotary_pct * kv_channels` dims, base `rotary_emb_base`;
- dynamic NTK (`use_dynamic_ntk`): at prefill, alpha = max(2**ceil(log2(L / seq_length) + 1) - 1, 1)
  for a prompt of L rows and the rotary base becomes base * alpha**(d / (d - 2)); decode steps
  reuse the prompt's alpha (as the original, which caches it at the prefill) and cached keys
  are never re-rotated. The alpha lives in the cache (`ModalCache.rotary_state`, one per sample);
- logn attention (`use_logn_attn`): the query at position p is multiplied by
  log(p + 1) / log(seq_length) when p + 1 > seq_length (after rotary; keys untouched).

Positions count the valid rows of each sample (left padding does not shift them), and L is each
sample's own prompt length; the original uses the padded batch length for both, which equals
ours for a batch of one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from avl.cache.layout import PromptLayout
from avl.cache.modal_cache import DecodeStep, ModalCache
from avl.cache.policies import FeaturePolicy, Policy
from avl.models.config import config_fields, require
from avl.models.decoder import CachedDecoder
from avl.models.layers import GatedMLP, RMSNorm, compute_dtype, prefill_attention
from avl.models.qwen_vit import QwenVisionTransformer, QwenVisualConfig

_LAYER = r"transformer\.h\.(\d+)\."
# Checkpoint key (the hub's `transformer.*` names) -> module name, first match wins.
QWEN_VL_KEY_MAP = (
    ("transformer.visual.", "visual."),
    ("transformer.wte.", "language_model.embed_tokens."),
    ("transformer.ln_f.", "language_model.norm."),
    ("lm_head.", "language_model.lm_head."),
    (re.compile(_LAYER + r"ln_1\."), r"language_model.layers.\1.input_layernorm."),
    (re.compile(_LAYER + r"ln_2\."), r"language_model.layers.\1.post_attention_layernorm."),
    (re.compile(_LAYER + r"attn\."), r"language_model.layers.\1.self_attn."),  # c_attn, c_proj
    (re.compile(_LAYER + r"mlp\.w1\."), r"language_model.layers.\1.mlp.up_proj."),
    (re.compile(_LAYER + r"mlp\.w2\."), r"language_model.layers.\1.mlp.gate_proj."),  # silu(w2(x))
    (re.compile(_LAYER + r"mlp\.c_proj\."), r"language_model.layers.\1.mlp.down_proj."),
)


@dataclass(frozen=True)
class QwenVLConfig:
    """A Qwen-VL `config.json` (model_type "qwen", the hub's QWenConfig field names)."""

    visual: QwenVisualConfig = field(default_factory=QwenVisualConfig)
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    seq_length: int = 2048
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        require(self.kv_channels * self.num_attention_heads == self.hidden_size, "kv_channels", self.kv_channels,
                f"hidden_size / num_attention_heads = {self.hidden_size / self.num_attention_heads}")
        require(0 < self.rotary_pct <= 1 and self.rotary_dims % 2 == 0 and self.rotary_dims > 2, "rotary_pct",
                self.rotary_pct, "a share in (0, 1] giving an even number of rotary dims > 2")
        require(self.seq_length >= 2, "seq_length", self.seq_length, "an integer >= 2")
        require(self.visual.output_dim == self.hidden_size, "visual.output_dim", self.visual.output_dim,
                f"hidden_size={self.hidden_size} (visual features are written into the hidden states)")
        require(self.visual.image_start_id + 1 < self.vocab_size, "visual.image_start_id",
                self.visual.image_start_id, f"< vocab_size - 1 = {self.vocab_size - 1} (<img> and </img> are embedded)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenVLConfig:
        fields_ = config_fields(cls, raw)
        fields_["visual"] = QwenVisualConfig.from_dict(raw.get("visual") or {})
        return cls(**fields_)

    @property
    def rotary_dims(self) -> int:
        """Head dims that are rotated (the original's `rotary_ndims`)."""
        return self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)

    @property
    def image_start_id(self) -> int:
        return self.visual.image_start_id

    @property
    def image_tokens_per_image(self) -> int:
        """Positions between `<img>` and `</img>`: one per resampler query."""
        return self.visual.n_queries




def rotate(x: Tensor, cos_sin: Tensor) -> Tensor:
    """Rotate the first R dims of x [B, H, L, D] (NeoX halves) with cos_sin [2, B, 1, L, R].

    Computed in the tables' dtype and cast back (the original rotates `t.float()`, the
    pass-through dims included, then `type_as(t)`).
    """
    cos, sin = cos_sin
    h = x.to(cos.dtype)
    rot, rest = h[..., : cos.shape[-1]], h[..., cos.shape[-1]:]
    half = rot.shape[-1] // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1).to(x.dtype)


class QwenAttention(nn.Module):
    def __init__(self, cfg: QwenVLConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.kv_channels
        self.scale = self.head_dim**-0.5
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=not cfg.no_bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, C] -> unrotated q, k, v [B, H, L, D] (q without the logn factor)."""
        b, n, _ = x.shape
        q, k, v = self.c_attn(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, D]
        return q, k, v

    def rotate_query(self, q: Tensor, cos_sin: Tensor, q_scale: Tensor) -> Tensor:
        """Rotary, then the logn factor q_scale [B, 1, L, 1]."""
        return rotate(q, cos_sin) * q_scale.to(q.dtype)

    def rotate_key(self, k: Tensor, cos_sin: Tensor, q_scale: Tensor) -> Tensor:
        """Rotary only: keys take no logn factor."""
        return rotate(k, cos_sin)

    def project(self, x: Tensor, cos_sin: Tensor, q_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, C] -> rotated q (times the logn factor q_scale [B, 1, L, 1]), k, v [B, H, L, D].

        `cos_sin`, `q_scale` are what `QwenLM.rotary` returns (CachedDecoder passes them through).
        """
        q, k, v = self.qkv(x)
        return self.rotate_query(q, cos_sin, q_scale), self.rotate_key(k, cos_sin, q_scale), v

    def output(self, out: Tensor) -> Tensor:
        """out [B, H, L, D] -> [B, L, C]."""
        return self.c_proj(out.transpose(1, 2).flatten(2))


class QwenBlock(nn.Module):
    def __init__(self, cfg: QwenVLConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)  # ln_1
        self.self_attn = QwenAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)  # ln_2
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size // 2, bias=not cfg.no_bias)  # w2 gates w1

    def finish(self, h: Tensor, attn_out: Tensor) -> Tensor:
        h = h + self.self_attn.output(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenLM(CachedDecoder):
    """Qwen decoder (`transformer.wte`, `h.N`, `ln_f`, `lm_head`) driven by the policy loop of
    `CachedDecoder`. `rotary` returns (cos_sin [2, B, 1, L, R], q_scale [B, 1, L, 1]): the rotary
    tables and the logn factor of the queries, which `QwenAttention.project` consumes."""

    def __init__(self, cfg: QwenVLConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(QwenBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # dtype of the rotary tables and rotation; None: at least float32 (float64 stays float64).
        self.island_dtype: torch.dtype | None = None

    # -- length tricks -----------------------------------------------------------------------
    def ntk_alpha(self, prompt_rows: Tensor) -> Tensor:
        """Dynamic-NTK alpha of prompts of `prompt_rows` [B] rows -> [B] float64 (1 when off or short)."""
        if not self.config.use_dynamic_ntk:
            return torch.ones(prompt_rows.shape, dtype=torch.float64, device=prompt_rows.device)
        # the original's math.log(L / seq_length, 2), i.e. log(x) / log(2), so ceil agrees at powers of 2
        context = torch.log(prompt_rows.to(torch.float64) / self.config.seq_length) / math.log(2) + 1
        return (2 ** context.ceil() - 1).clamp(min=1)

    def logn_scale(self, positions: Tensor) -> Tensor:
        """Query factor of positions [B, L] -> [B, 1, L, 1] float64: log(p+1)/log(seq_length) past seq_length."""
        if not self.config.use_logn_attn:
            return torch.ones(positions.shape, dtype=torch.float64, device=positions.device)[:, None, :, None]
        count = positions.to(torch.float64) + 1
        scale = torch.where(count > self.config.seq_length, count.log() / math.log(self.config.seq_length), 1.0)
        return scale[:, None, :, None]

    def rotary_tables(self, positions: Tensor, ntk_alpha: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, L], alpha [B] -> (cos_sin [2, B, 1, L, R], q_scale [B, 1, L, 1])."""
        table = self.island_dtype or compute_dtype(dtype)
        dims = self.config.rotary_dims
        base = self.config.rotary_emb_base * ntk_alpha ** (dims / (dims - 2))  # [B] float64
        exponent = torch.arange(0, dims, 2, device=positions.device, dtype=table) / dims  # [R/2]
        inv_freq = 1.0 / base.to(table)[:, None] ** exponent  # [B, R/2]
        freqs = positions.to(table)[..., None] * inv_freq[:, None]  # [B, L, R/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, R]
        return torch.stack([angles.cos(), angles.sin()]), self.logn_scale(positions)

    @staticmethod
    def prompt_rows(positions: Tensor) -> Tensor:
        """Prompt length of each sample from its prefill positions [B, L] (valid rows are 0..n-1)."""
        return positions.amax(-1) + 1

    # -- CachedDecoder hooks ------------------------------------------------------------------
    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Prefill tables: the alpha comes from the prompt length (max position + 1)."""
        return self.rotary_tables(positions, self.ntk_alpha(self.prompt_rows(positions)), dtype)

    def rotary_state(self, layout: PromptLayout) -> Tensor:
        """The prompt's dynamic-NTK alpha [B] (float64), fixed for the whole generation (the original
        caches it at the prefill too): `ModalCache.rotary_state`."""
        return self.ntk_alpha(self.prompt_rows(layout.positions))

    def decode_rotary(self, positions: Tensor, rotary_state: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Decode tables at positions [B, L], with the alpha cached at the prefill."""
        return self.rotary_tables(positions, rotary_state, dtype)

    def forward(self, h: Tensor, layout: PromptLayout) -> tuple[list[Tensor], Tensor]:
        """Dense forward without a cache: hidden states [L+1 entries of B, L, C] (input of each block,
        then ln_f of the last block's output) and logits [B, L, V] at every position."""
        cos_sin, q_scale = self.rotary(layout.positions, h.dtype)
        states = [h]
        for layer in self.layers:
            q, k, v = layer.self_attn.project(layer.input_layernorm(h), cos_sin, q_scale)
            h = layer.finish(h, prefill_attention(q, k, v, layout.valid, layer.self_attn.scale))
            states.append(h)
        states[-1] = self.norm(h)
        return states, self.lm_head(states[-1])


def image_span_mask(input_ids: Tensor, attention_mask: Tensor, start_id: int, span: int) -> Tensor:
    """Positions strictly between each `<img>` (start_id) and the next `</img>` (start_id + 1), [B, L].

    Raises ValueError naming the sample and position of an unmatched or nested tag, and of a
    span whose length is not `span`.
    """
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    valid = attention_mask.bool()
    for b in range(input_ids.shape[0]):
        row = input_ids[b].masked_fill(~valid[b], -1).tolist()
        start = None
        for i, token in enumerate(row):
            if token == start_id:
                if start is not None:
                    raise ValueError(f"sample {b}: <img> (id {start_id}) at position {i} inside the image span "
                                     f"opened at position {start}; close each span with </img> (id {start_id + 1})")
                start = i
            elif token == start_id + 1:
                if start is None:
                    raise ValueError(f"sample {b}: </img> (id {start_id + 1}) at position {i} without an <img> "
                                     f"(id {start_id}) before it")
                if i - start - 1 != span:
                    raise ValueError(f"sample {b}: the image span at positions {start + 1}..{i - 1} has "
                                     f"{i - start - 1} positions between <img> and </img>, but an image gives "
                                     f"{span} features (visual.n_queries)")
                mask[b, start + 1: i] = True
                start = None
        if start is not None:
            raise ValueError(f"sample {b}: <img> (id {start_id}) at position {start} has no </img> (id {start_id + 1})")
    return mask


class QwenVL(nn.Module):
    """Qwen-VL / Qwen-VL-Chat. `prefill` / `decode` are the entry points `avl.generate` uses."""

    key_map = QWEN_VL_KEY_MAP

    def __init__(self, cfg: QwenVLConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = QwenVisionTransformer(cfg.visual)
        self.language_model = QwenLM(cfg)

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters a checkpoint may omit because they are tied to another one."""
        if self.config.tie_word_embeddings:
            return {"language_model.lm_head.weight": "language_model.embed_tokens.weight"}
        return {}

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def set_reference_casts(self, enabled: bool = True) -> QwenVL:
        """Reproduce the original code's float32 islands in a float64 model: RMSNorm statistics, the
        rotary tables and rotation, and the position-table resizing in float32. Only for parity with
        float64 reference outputs; float32 / bfloat16 models compute those in float32 either way."""
        for module in self.modules():
            if hasattr(module, "island_dtype"):
                module.island_dtype = torch.float32 if enabled else None
        return self

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, S, S] -> features [N, n_queries, hidden]."""
        return self.visual(pixel_values)

    def embed(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None) -> tuple[Tensor, Tensor]:
        """Token embeddings with the image spans overwritten by the visual features, and the span mask."""
        per_image = self.config.image_tokens_per_image
        image_mask = image_span_mask(input_ids, attention_mask, self.config.image_start_id, per_image)  # [B, L]
        n_spans = int(image_mask.sum()) // per_image
        if pixel_values is not None:
            self.visual.check_pixels(pixel_values)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_spans != n_images:
            raise ValueError(
                f"the prompt has {n_spans} image span(s) (<img> id {self.config.image_start_id} ... </img> id "
                f"{self.config.image_start_id + 1}) but {n_images} image(s) were given: one image per span, in order"
            )
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(image_mask, 0))  # [B, L, C]
        if n_images:
            features = self.image_features(pixel_values).to(embeds.dtype).flatten(0, 1)  # [N * Q, C]
            embeds = embeds.masked_scatter(image_mask[..., None], features)
        return embeds, image_mask

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, policy: Policy,
                new_tokens: int, feature_policy: FeaturePolicy | None = None) -> tuple[Tensor, ModalCache]:
        """Run the prompt: next-token logits [B, V] and the compacted cache, sized for `new_tokens` decode steps."""
        embeds, image_mask = self.embed(input_ids, attention_mask, pixel_values)
        layout = PromptLayout.from_prompt(image_mask, attention_mask)
        return self.language_model.prefill(embeds, layout, policy, new_tokens, feature_policy=feature_policy)

    def decode(self, token: Tensor, cache: ModalCache, step: DecodeStep | None = None) -> Tensor:
        return self.language_model.decode(token, cache, step)

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Dense forward of a whole (left-padded) sequence without a cache: (hidden states, logits [B, L, V])."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds, image_mask = self.embed(input_ids, attention_mask, pixel_values)
        return self.language_model(embeds, PromptLayout.from_prompt(image_mask, attention_mask))
