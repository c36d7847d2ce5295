"""The policy-driven decoder loop shared by every decoder-only family (Llama, Mistral, Qwen).

A family's language model subclasses `CachedDecoder` and provides `embed_tokens`, `layers`,
`norm`, `lm_head` and `rotary(positions, dtype)`. Each layer has `input_layernorm`, a
`self_attn` with `project(x, a, b) -> q, k, v`, `output(out)` and `scale`, and
`finish(h, attn_out) -> h` (residual, MLP). The pair `(a, b)` that `rotary` returns is opaque to
the loop and goes to `project` as is: cos and sin for Llama; Qwen's rotary table and logn query
scale. The cache policies then work on the family unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from avl.cache.layout import Modality, PromptLayout, packed_index, top_rows
from avl.cache.modal_cache import LayerCache, ModalCache, attend
from avl.cache.policies import Policy, build_layer_cache, decode_update
from avl.models.layers import attention_probs, prefill_attention


def _group_sum(x: Tensor, kv_heads: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...]: sum over the query heads sharing a KV head."""
    return x.unflatten(1, (kv_heads, -1)).sum(2)


class CachedDecoder(nn.Module):
    """`prefill` runs the prompt layer by layer; after each layer's attention the policy's cache
    for that layer is built (so peak KV memory is the compacted cache plus one full layer), and
    a policy may drop image rows from the hidden states. `decode` runs one token per sample
    against the `ModalCache`.
    """

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The position tables `project` takes for rotary positions [B, L] (Llama: cos, sin [B, 1, L, D])."""
        raise NotImplementedError

    def decode_rotary(self, cache: ModalCache, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rotary tables of a decode step; a family whose tables depend on more than the position
        (Qwen's dynamic NTK: the prompt's alpha, kept in its cache) overrides this."""
        return self.rotary(cache.next_position[:, None], dtype)

    def prefill(self, h: Tensor, layout: PromptLayout, policy: Policy, new_tokens: int) -> tuple[Tensor, ModalCache]:
        """h [B, L, C] prompt embeddings (left-padded) -> next-token logits [B, V] and the cache."""
        policy.check_layers(len(self.layers))
        n_image = layout.count(Modality.IMAGE)  # the original counts: every ratio refers to them
        full_rows = layout.valid.sum(-1)
        next_position = layout.positions[:, -1] + 1
        caches: list[LayerCache] = []
        cos, sin = self.rotary(layout.positions, h.dtype)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            out = prefill_attention(q, k, v, layout.valid, attn.scale)
            image_scores = self._image_scores(q, k, layout, attn.scale) if policy.needs_image_scores(i) else None
            evict_scores = self._received_scores(q, k, layout, policy.scoring_queries(layout), attn.scale)
            caches.append(build_layer_cache(policy, layout, k, v, n_image, image_scores, evict_scores, new_tokens))
            h = layer.finish(h, out)
            keep = policy.prune_keep(i)
            if keep is not None:
                h, layout = self._drop_image_rows(h, layout, image_scores, (n_image.double() * keep).long())
                cos, sin = self.rotary(layout.positions, h.dtype)
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
        index = packed_index(layout.valid & (~image | top_rows(scores, image, keep)))  # [B, L']
        h = h.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))
        return h, layout.select(index)

    def decode(self, token: Tensor, cache: ModalCache, policy: Policy, refresh: bool) -> Tensor:
        """One decode step: token [B] -> logits [B, V]; updates the cache in place."""
        h = self.embed_tokens(token)[:, None]  # [B, 1, C]
        position = cache.next_position
        cos, sin = self.decode_rotary(cache, h.dtype)
        for layer, layer_cache in zip(self.layers, cache.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            out, probs = attend(layer_cache, q, k, v, position, refresh, attn.scale)
            decode_update(policy, layer_cache, probs, refresh)
            h = layer.finish(h, out)
        cache.advance()
        return self.lm_head(self.norm(h[:, 0]))
