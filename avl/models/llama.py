"""Llama-family decoder (Llama, Vicuna, Mistral) with policy-driven prefill and cached decode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from avl.cache.layout import Modality, PromptLayout, packed_index
from avl.cache.modal_cache import LayerCache, ModalCache, attend
from avl.cache.policies import Policy, build_layer_cache, decode_update
from avl.models.config import config_fields, require
from avl.models.layers import GatedMLP, RMSNorm, apply_rotary, attention_probs, prefill_attention, rotary_cos_sin


@dataclass(frozen=True)
class LlamaConfig:
    """The hub's `text_config` of a Llama / Vicuna / Mistral model (GQA and rope_theta are switches)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        require(self.num_attention_heads % self.num_key_value_heads == 0, "text_config.num_key_value_heads",
                self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        require(self.hidden_act == "silu", "text_config.hidden_act", self.hidden_act, ["silu"])
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        require(rope_type == "default", "text_config.rope_scaling", self.rope_scaling, "None (plain rotary)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        fields = config_fields(cls, raw)
        theta = (raw.get("rope_parameters") or {}).get("rope_theta")  # transformers >= 5 nests it here
        if theta is not None and "rope_theta" not in fields:
            fields["rope_theta"] = theta
        return cls(**fields)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, C] -> rotated q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D]."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def output(self, out: Tensor) -> Tensor:
        """out [B, Hq, L, D] -> [B, L, C]."""
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def finish(self, h: Tensor, attn_out: Tensor) -> Tensor:
        h = h + self.self_attn.output(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))


def _group_sum(x: Tensor, kv_heads: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...]: sum over the query heads sharing a KV head."""
    return x.unflatten(1, (kv_heads, -1)).sum(2)


class LlamaModel(nn.Module):
    """Token embedding, decoder layers, final norm and LM head.

    `prefill` runs the prompt layer by layer; after each layer's attention the policy's cache
    for that layer is built (so peak KV memory is the compacted cache plus one full layer), and
    a policy may drop image rows from the hidden states. `decode` runs one token per sample
    against the `ModalCache`.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def prefill(self, h: Tensor, layout: PromptLayout, policy: Policy, new_tokens: int) -> tuple[Tensor, ModalCache]:
        """h [B, L, C] prompt embeddings (left-padded) -> next-token logits [B, V] and the cache."""
        policy.check_layers(len(self.layers))
        n_image = layout.count(Modality.IMAGE)  # the original counts: every ratio refers to them
        full_rows = layout.valid.sum(-1)
        next_position = layout.positions[:, -1] + 1
        caches: list[LayerCache] = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            cos, sin = self.rotary(layout.positions, h.dtype)
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            out = prefill_attention(q, k, v, layout.valid, attn.scale)
            image_scores = self._image_scores(q, k, layout, attn.scale) if policy.needs_image_scores(i) else None
            evict_scores = self._received_scores(q, k, layout, policy.scoring_queries(layout), attn.scale)
            caches.append(build_layer_cache(policy, layout, k, v, n_image, image_scores, evict_scores, new_tokens))
            h = layer.finish(h, out)
            keep = policy.prune_keep(i)
            if keep is not None:
                h, layout = self._drop_image_rows(h, layout, image_scores, (n_image.double() * keep).long())
        logits = self.lm_head(self.norm(h[:, -1]))
        return logits, ModalCache(caches, next_position, full_rows)

    @staticmethod
    def _image_scores(q: Tensor, k: Tensor, layout: PromptLayout, scale: float) -> Tensor:
        """Head-mean attention of the last prompt token over all rows, [B, L]."""
        last = torch.full((q.shape[0], 1), q.shape[2] - 1, device=q.device)
        return attention_probs(q[:, :, -1:], last, k, layout.valid, scale)[:, :, 0].mean(1)

    @staticmethod
    def _received_scores(q: Tensor, k: Tensor, layout: PromptLayout, queries: Tensor | None,
                         scale: float) -> Tensor | None:
        """Attention each row receives from the `queries` rows [B, L], summed per KV head: [B, Hkv, L]."""
        if queries is None:
            return None
        rows = packed_index(queries, min_width=1)  # [B, R]
        q_rows = q.gather(2, rows.clamp(min=0)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
        probs = attention_probs(q_rows, rows, k, layout.valid, scale)  # [B, Hq, R, L]
        return _group_sum(probs.sum(2), k.shape[1])

    @staticmethod
    def _drop_image_rows(h: Tensor, layout: PromptLayout, scores: Tensor, keep: Tensor) -> tuple[Tensor, PromptLayout]:
        """Keep the top `keep` [B] image rows by score (and every other row), original order and positions."""
        image = layout.modality == Modality.IMAGE
        rank = scores.masked_fill(~image, float("-inf")).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        index = packed_index(layout.valid & (~image | (rank < keep[:, None])))  # [B, L']
        h = h.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))
        return h, layout.select(index)

    def decode(self, token: Tensor, cache: ModalCache, policy: Policy, refresh: bool) -> Tensor:
        """One decode step: token [B] -> logits [B, V]; updates the cache in place."""
        h = self.embed_tokens(token)[:, None]  # [B, 1, C]
        position = cache.next_position
        cos, sin = self.rotary(position[:, None], h.dtype)
        for layer, layer_cache in zip(self.layers, cache.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            out, probs = attend(layer_cache, q, k, v, position, refresh, attn.scale)
            decode_update(policy, layer_cache, probs, refresh)
            h = layer.finish(h, out)
        cache.advance()
        return self.lm_head(self.norm(h[:, 0]))
