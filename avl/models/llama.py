"""Llama-family decoder (Llama, Vicuna, Mistral): config, layers, and the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from avl.models.config import config_fields, require
from avl.models.decoder import CachedDecoder
from avl.models.layers import GatedMLP, RMSNorm, apply_rotary, rotary_cos_sin


@dataclass(frozen=True)
class LlamaConfig:
    """The hub's `text_config` of a Llama / Vicuna / Mistral model (GQA and rope_theta are switches).

    attention_bias: biases on q, k, v and o (Llama's flag). qkv_bias: biases on q, k, v only, the
    output projection without (Qwen2's layout; not a field of its config.json, set by its family).
    """

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
    qkv_bias: bool = False  # q/k/v biases without an output bias (Qwen2); attention_bias: all four (Llama)
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
        rope = raw.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta and rope_type here
        if rope.get("rope_theta") is not None and "rope_theta" not in fields:
            fields["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in fields:
            fields["rope_scaling"] = rope  # rejected by __post_init__ like an old-style rope_scaling
        return cls(**fields)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, C] -> unrotated q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D]."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def rotate_query(self, q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary(q, cos, sin)

    def rotate_key(self, k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary(k, cos, sin)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, C] -> rotated q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D]."""
        q, k, v = self.qkv(x)
        return self.rotate_query(q, cos, sin), self.rotate_key(k, cos, sin), v

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


class LlamaModel(CachedDecoder):
    """Token embedding, Llama decoder layers, final norm and LM head."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)
