"""The ONE policy-driven prefill/decode loop, over self-attention and cross-attention blocks alike.

A family's language model subclasses `CachedDecoder` and provides `embed_tokens`, `layers`,
`norm`, `lm_head` and `rotary(positions, dtype)` (`prompt_rotary(layout, dtype)` when the prompt's
rotary positions are not `layout.positions`: Qwen2-VL's M-RoPE). A self-attention block has
`input_layernorm`, a `self_attn` with `qkv(x) -> q, k, v` (unrotated), `rotate_query(q, a, b)`,
`rotate_key(k, a, b)`, `output(out)` and `scale`, and `finish(h, attn_out) -> h` (residual, MLP).
The pair `(a, b)` that `rotary` returns is opaque to the loop and goes to the rotations as is: cos
and sin for Llama; Qwen's rotary table and logn query scale. A policy that `shifts_positions`
(StreamingLLM's pos_shift) hands each decode step's unrotated q and k to the cache with a `Rotate`
built from the same hooks (`decode_rotary` per row), so the cache rotates them for the positions
inside it. A cross-attention block (Llama-3.2-Vision) is a `CrossAttentionBlock`: it reads image
features in prefill and its `CrossLayerCache` in decode. The cache policies then work on every
family unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from avl.cache.layout import Modality, PromptLayout, packed_index, top_rows
from avl.cache.modal_cache import CrossLayerCache, DecodeStep, LayerCache, ModalCache, Rotate
from avl.cache.policies import FeaturePolicy, LayerScores, Policy, build_layer_cache
from avl.models.layers import attention_probs, attention_received, prefill_attention


class AttentionObserver(Protocol):
    """Sees the attention a `CachedDecoder` runs, when set as its `observer` (`avl.analysis`)."""

    def prefill(self, layer: int, layout: PromptLayout, probs: Tensor) -> None:
        """Self-attention block `layer` in prefill: the last prompt row's head-mean probabilities over
        the layout's rows, [B, L]."""

    def decode(self, layer: int, idx: Tensor, probs: Tensor) -> None:
        """A decode step of block `layer`: the cache slots it attended, idx [B, Hkv, M], and the
        gathered-attention op's probabilities over them, probs [B, Hq, M]."""

    def cross(self, layer: int, allowed: Tensor, probs: Tensor) -> None:
        """Cross-attention block `layer`: the feature slots its query row attends, allowed [B, N], and
        the probabilities over them, probs [B, Hq, N] (0 where not allowed); first for the last prompt
        row in prefill (over the image context the block attended), then for each decode step's token
        (over its `CrossLayerCache`)."""


CrossObserver = Callable[[Tensor, Tensor], None]
"""`observe(allowed, probs)`: an `AttentionObserver.cross` bound to one block."""


class CrossAttentionBlock(nn.Module):
    """A decoder block that cross-attends image features instead of self-attending.

    `prefill(h, layout, image, feature_policy, observe)` runs the prompt over the image context (its
    type is the family's) and returns `(h, image, cache)`: the context later cross-attention blocks
    use (trimmed when `feature_policy` trims, which the loop passes to the first such block only) and
    this block's `CrossLayerCache`. `decode(h, cache)` runs one token over that cache. `observe`
    (None unless the decoder has an observer) is called with the last prompt row's attention, and the
    returned cache calls it on each decode step (`AttentionObserver.cross`).
    """

    def prefill(self, h: Tensor, layout: PromptLayout, image: object, feature_policy: FeaturePolicy | None,
                observe: CrossObserver | None = None) -> tuple[Tensor, object, CrossLayerCache]:
        raise NotImplementedError

    def decode(self, h: Tensor, cache: CrossLayerCache) -> Tensor:
        raise NotImplementedError


class CachedDecoder(nn.Module):
    """`prefill` runs the prompt block by block; after each self-attention block's attention the
    policy's cache for that block is built (so peak KV memory is the compacted cache plus one full
    layer; a policy with `layer_scores`, VL-Cache, builds every layer's cache at the prefill's end,
    once its shared budget is split), and a policy may drop image rows from the hidden states.
    `decode` runs one token per sample against the `ModalCache`, one cache call per block.

    `observer` (None: nothing changes) is handed each self-attention block's last-prompt-row
    probabilities in prefill, and is wired into the block's `LayerCache` to see every decode step's
    probabilities; cross-attention blocks get it bound to their index (`observe`) and hand it their
    query row's probabilities the same way. A Python callback, so only for eager decode
    (`avl.analysis.observing` sets it).
    """

    observer: AttentionObserver | None = None

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The position tables the rotations take for rotary positions [B, L] (Llama: cos, sin [B, 1, L, D])."""
        raise NotImplementedError

    def prompt_rotary(self, layout: PromptLayout, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rotary tables of the prompt rows of `layout` (after a prefill drop too): by default
        `rotary(layout.positions)`; Qwen2-VL: M-RoPE of `layout.rope_positions`."""
        return self.rotary(layout.positions, dtype)

    def rotary_state(self, layout: PromptLayout) -> Tensor | None:
        """Per-sample rotary state fixed at prefill that decode needs besides the position
        (`ModalCache.rotary_state`); None by default. Qwen-VL: the prompt's dynamic-NTK alpha."""
        return None

    def decode_rotary(self, positions: Tensor, rotary_state: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rotary tables of decode rows at positions [B, L], for rows [B, H, L, D]: each table
        broadcasts against them (the row on dim -2, the heads on dim -3)."""
        return self.rotary(positions, dtype)

    def rotation(self, attn: nn.Module, rotary_state: Tensor | None) -> Rotate:
        """The `Rotate` of a shifted cache: `attn`'s rotations with this family's decode tables and
        the prompt's `rotary_state`, at positions [B, H, n] for rows [B, H, n, D] (a few rows per
        head: the query, the new key, the pinned rows)."""
        def rotate(x: Tensor, positions: Tensor, query: bool) -> Tensor:
            b, heads, n, _ = x.shape
            tables = self.decode_rotary(positions.reshape(b, heads * n), rotary_state, x.dtype)
            tables = tree_map(lambda t: t.unflatten(-2, (heads, n)).squeeze(-4), tables)
            return (attn.rotate_query if query else attn.rotate_key)(x, *tables)

        return rotate

    def check_policy(self, policy: Policy, feature_policy: FeaturePolicy | None) -> None:
        """Raise if the policies cannot run on this model (a layer it lacks, a feature policy it has no use for)."""
        policy.check_layers(len(self.layers))
        if feature_policy is not None and feature_policy.in_sequence:
            raise ValueError(f"feature_policy={feature_policy!r} selects the image features of the token sequence, "
                             "which this model family does not support; allowed: LLaVA-1.5 and LLaVA-NeXT "
                             "(model_type 'llava', 'llava_next')")
        if feature_policy is not None and not any(isinstance(b, CrossAttentionBlock) for b in self.layers):
            raise ValueError(f"feature_policy={feature_policy!r} trims the image features of cross-attention layers, "
                             "but this model has none (its image tokens are in the sequence, e.g. LLaVA); use it with "
                             "Llama-3.2-Vision (model_type 'mllama'), or AVL / FastV for decoder-only models")

    def prefill(self, h: Tensor, layout: PromptLayout, policy: Policy, new_tokens: int, image: object = None,
                feature_policy: FeaturePolicy | None = None) -> tuple[Tensor, ModalCache]:
        """h [B, L, C] prompt embeddings (left-padded) -> next-token logits [B, V] and the cache.

        `image`: the cross-attention blocks' image context (None: they are skipped, text only).
        `new_tokens`: the decode steps the cache is sized for.
        """
        self.check_policy(policy, feature_policy)
        n_image = layout.count(Modality.IMAGE)  # the original counts: every ratio refers to them
        full_rows = layout.valid.sum(-1)
        next_position = layout.positions[:, -1] + 1
        rotary_state = self.rotary_state(layout)
        caches: list[LayerCache | CrossLayerCache | None] = []
        waiting: list[tuple[int, partial[LayerCache], LayerScores]] = []  # (block, its cache's builder, its scores)
        a, b = self.prompt_rotary(layout, h.dtype)
        for i, block in enumerate(self.layers):
            if isinstance(block, CrossAttentionBlock):
                layer_cache = None
                if image is not None:
                    observe = None if self.observer is None else partial(self.observer.cross, i)
                    h, image, layer_cache = block.prefill(h, layout, image, feature_policy, observe)
                    feature_policy = None  # features are selected once, at the first cross-attention block
                caches.append(layer_cache)
                continue
            attn = block.self_attn
            q, k, v = attn.qkv(block.input_layernorm(h))
            q, k = attn.rotate_query(q, a, b), attn.rotate_key(k, a, b)
            out = prefill_attention(q, k, v, layout.valid, attn.scale)
            scored = policy.needs_image_scores(i) or self.observer is not None
            image_scores = self._image_scores(q, k, layout, attn.scale) if scored else None
            evict_scores = self._received_scores(q, k, layout, policy.scoring_queries(layout), attn.scale)
            build = partial(build_layer_cache, policy, layout, k, v, n_image, image_scores, evict_scores, new_tokens)
            if self.observer is not None:
                self.observer.prefill(i, layout, image_scores)
            shared = policy.layer_scores(i, q, k, layout, attn.scale)
            if shared is None:
                caches.append(self._observed(build(policy.prompt_keep(i, len(self.layers), q, k, layout.valid,
                                                                      attn.scale)), i))
            else:  # the layer's full K/V waits for every layer's scores (VL-Cache's shared budget)
                waiting.append((len(caches), build, shared))
                caches.append(None)
            h = block.finish(h, out)
            keep = policy.prune_keep(i)
            if keep is not None:
                h, layout = self._drop_image_rows(h, layout, image_scores, (n_image.double() * keep).long())
                a, b = self.prompt_rotary(layout, h.dtype)
        if waiting:
            keeps = policy.shared_keep([shared for _, _, shared in waiting])
            for (index, build, _), keep in zip(waiting, keeps):
                caches[index] = self._observed(build(keep), index)
        logits = self.lm_head(self.norm(h[:, -1]))
        return logits, ModalCache(caches, policy, next_position, full_rows, new_tokens, rotary_state)

    def _observed(self, layer_cache: LayerCache, layer: int) -> LayerCache:
        """`layer_cache` wired to the observer's decode callback for block `layer`, if an observer is set."""
        if self.observer is not None:
            layer_cache.observer = partial(self.observer.decode, layer)
        return layer_cache

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
        received = attention_received(q_rows, rows, k, layout.valid, scale)  # [B, Hq, L]
        return received.unflatten(1, (k.shape[1], -1)).sum(2)

    @staticmethod
    def _drop_image_rows(h: Tensor, layout: PromptLayout, scores: Tensor, keep: Tensor) -> tuple[Tensor, PromptLayout]:
        """Keep the top `keep` [B] image rows by score (and every other row), original order and positions."""
        image = layout.modality == Modality.IMAGE
        index = packed_index(layout.valid & (~image | top_rows(scores, image, keep)))  # [B, L']
        h = h.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))
        return h, layout.select(index)

    def decode(self, token: Tensor, cache: ModalCache, step: DecodeStep | None = None) -> Tensor:
        """One decode step: token [B] -> logits [B, V]; updates the cache in place.

        `step` is the host-side plan of this step, `cache.next_step()`; it is taken here when None.
        A compiled decode takes it as an argument (see `avl.generate.compile_decode`), so that the
        compiled graph never reads the host's counters.
        """
        step = cache.next_step() if step is None else step
        h = self.embed_tokens(token)[:, None]  # [B, 1, C]
        shifted = cache.policy.shifts_positions()
        if not shifted:
            a, b = self.decode_rotary(cache.next_position[:, None], cache.rotary_state, h.dtype)
        for block, layer_cache, width in zip(self.layers, cache.layers, step.widths):
            if isinstance(block, CrossAttentionBlock):
                if layer_cache is not None:
                    h = block.decode(h, layer_cache)
                continue
            attn = block.self_attn
            q, k, v = attn.qkv(block.input_layernorm(h))
            if shifted:  # the cache rotates q and k for the positions inside it
                out = layer_cache.step(q, k, v, attn.scale, step.refresh, width,
                                       self.rotation(attn, cache.rotary_state))
            else:
                q, k = attn.rotate_query(q, a, b), attn.rotate_key(k, a, b)
                out = layer_cache.step(q, k, v, attn.scale, step.refresh, width)
            h = block.finish(h, out)
        cache.advance()
        return self.lm_head(self.norm(h[:, 0]))
