"""KV-cache policies: what each layer's cache keeps after prefill and attends in decode.

A policy is a small frozen dataclass, shared by all layers (per-layer state lives in the
cache). It answers these questions; `build_layer_cache` applies them at prefill and
`LayerCache.step` in decode (the cache holds the policy's `Budget`):

- `roles(layout)`: which prompt rows are pinned (always attended), image rows subject to the
  secondary/core selection, or evictable under a `Budget`;
- `image_counts(n_image)`: how many image rows each layer keeps (secondary) and computes (core);
- `eviction()`: the `Budget` of the evictable rows;
- `prune_keep(layer)`: whether image hidden states are dropped after a prefill layer;
- `prompt_keep(layer, ...)`: each KV head's evictable prompt rows kept after a prefill layer's
  attention, chosen from its queries and keys (the kvpress-pinned policies); None for the others;
- `layer_scores(layer, ...)` / `shared_keep(...)`: the same choice for a policy that splits one budget
  over the layers (VL-Cache): each layer's scores are taken as it runs, the rows are chosen once every
  layer has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from avl.cache.layout import Modality, PromptLayout, packed_index, top_rows
from avl.cache.modal_cache import Budget, LayerCache, keep_heavy_and_recent
from avl.models.layers import compute_dtype


class Role(IntEnum):
    NONE = 0  # padding
    PINNED = 1  # kept and attended at every step
    IMAGE = 2  # kept if among the secondary rows, attended if core (or on refresh steps)
    EVICTABLE = 3  # kept while within the budget


def _check_ratio(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is a {type(value).__name__}; allowed: a ratio in (0, 1] (a float), "
                         "or None to turn it off")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} is out of range; allowed: a ratio in (0, 1], or None to turn it off")


def _check_count(name: str, value: int | None, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is a {type(value).__name__}; allowed: an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} is out of range; allowed: an integer >= {minimum}")


@dataclass(frozen=True)
class LayerScores:
    """One prefill layer's statistics for a policy that splits one budget over the layers
    (`Policy.layer_scores`): its rows' scores and its claim on the shared budget."""

    scores: Tensor  # [B, Hkv, L] higher = kept; -inf on padding
    weight: Tensor  # [B] the layer's weight in the split of each sample's budget (> 0)
    valid: Tensor  # [B, L] the layer's prompt rows (False on left padding)


@dataclass(frozen=True)
class Policy:
    """Base: the full cache. Subclasses override the parts they change."""

    def roles(self, layout: PromptLayout) -> Tensor:
        roles = torch.full_like(layout.modality, Role.EVICTABLE)
        roles = roles.masked_fill(layout.modality == Modality.SYSTEM, Role.PINNED)
        roles = roles.masked_fill(layout.modality == Modality.IMAGE, Role.IMAGE)
        return roles.masked_fill(~layout.valid, Role.NONE)

    def selects_image_rows(self) -> bool:
        """Whether `image_counts` ranks and drops image rows in every layer."""
        return False

    def image_counts(self, n_image: Tensor) -> tuple[Tensor, Tensor] | None:
        """(secondary, core) rows per sample [B], or None to keep and attend every image row."""
        return None

    def eviction(self) -> Budget:
        """The budget of the evictable rows."""
        return Budget()

    def refresh_interval(self) -> int | None:
        """Core refresh interval K: decode steps t with t % K == 0 attend all secondary rows."""
        return None

    def prune_keep(self, layer: int) -> float | None:
        """Share of the original image rows whose hidden states survive after prefill `layer`."""
        return None

    def scoring_queries(self, layout: PromptLayout) -> Tensor | None:
        """Query rows [B, L] whose attention, summed, is the evictable rows' initial score."""
        return None

    def prompt_keep(self, layer: int, num_layers: int, q: Tensor, k: Tensor, valid: Tensor,
                    scale: float) -> Tensor | None:
        """Keep mask [B, Hkv, L] of prefill `layer`'s prompt rows, per KV head (counts may differ
        between heads and layers), from the layer's q [B, Hq, L, D] (rotary applied), k [B, Hkv, L, D],
        valid [B, L] and attention scale; applied to the evictable rows. None: keep what the roles
        and the budget keep."""
        return None

    def layer_scores(self, layer: int, q: Tensor, k: Tensor, layout: PromptLayout,
                     scale: float) -> LayerScores | None:
        """Prefill `layer`'s scores for a keep decision taken after every layer has run (`shared_keep`),
        from the same q, k and scale as `prompt_keep` and the prompt's layout. None: the layer's cache
        is built right after its attention (every policy but VL-Cache). Otherwise each layer's full
        K/V waits until the prefill's end: its peak KV memory is that of the uncompressed cache."""
        return None

    def shared_keep(self, layers: list[LayerScores]) -> list[Tensor]:
        """Keep masks [B, Hkv, L] of the evictable rows, one per self-attention layer in order, from
        every layer's `layer_scores`."""
        raise NotImplementedError(f"{type(self).__name__} returns layer_scores but has no shared_keep")

    def check_layers(self, num_layers: int) -> None:
        """Raise if the policy names a layer the model does not have."""

    def needs_image_scores(self, layer: int) -> bool:
        """Whether prefill `layer` must score image rows by the last prompt token's attention."""
        return self.selects_image_rows() or self.prune_keep(layer) is not None

    def shifts_positions(self) -> bool:
        """Whether decode attends as if every key were at its index inside the cache and the query at
        the cache length (StreamingLLM's pos_shift), rather than at the rows' original positions
        (`LayerCache.shift`). Needs a recency-only `eviction` (`Budget(fixed=...)` or none), so that
        the live evictable rows are the most recent ones, and pinned rows that precede the others."""
        return False


class FeaturePolicy:
    """Base of the policies that select image features before they enter the language model or
    its cross-attention (`Trim`, `VisionZip`), composed with a sequence `Policy` at the call:
    `generate(..., policy=..., feature_policy=...)`. `in_sequence`: whether it selects the features
    written into the token sequence (VisionZip: the model that applies it says so in its own
    `check_policy`) rather than those of the cross-attention layers (Trim)."""

    in_sequence: ClassVar[bool] = False


@dataclass(frozen=True)
class Full(Policy):
    """Keep and attend every row: the uncompressed model."""


@dataclass(frozen=True)
class AVL(Policy):
    """A-VL: adaptive attention for LVLMs. Each part is off when None.

    Counts are taken of the ORIGINAL number of image tokens N_img of each sample.

    - secondary (S): image rows kept per layer after prefill, `int(S * N_img)`, ranked by the
      attention of the last prompt token averaged over heads; the rest are evicted.
    - core (C): image rows computed in decode, `int(C * N_img)`, the top of the same ranking;
      needs `secondary` and `refresh_every`.
    - refresh_every (K): every K-th decode step attends all secondary rows and re-ranks the core.
    - prefill_keep (P): after prefill layer `prefill_layer - 1`, only the hidden states of the top
      `int(P * N_img)` image tokens go on to later layers (original positions kept).
    - text_keep (T): rows after the image follow H2O per head with a budget of
      `max(round(T * L_text), text_min_budget)`, `text_heavy_share` of it heavy hitters.
    """

    secondary: float | None = None
    core: float | None = None
    refresh_every: int | None = None
    prefill_keep: float | None = None
    text_keep: float | None = None
    prefill_layer: int = 2
    text_heavy_share: float = 0.5
    text_min_budget: int = 4

    def __post_init__(self) -> None:
        for name in ("secondary", "core", "prefill_keep", "text_keep"):
            _check_ratio(name, getattr(self, name))
        _check_count("refresh_every", self.refresh_every, 1)
        _check_count("prefill_layer", self.prefill_layer, 1)
        _check_count("text_min_budget", self.text_min_budget, 1)
        if not 0.0 <= self.text_heavy_share <= 1.0:
            raise ValueError(f"text_heavy_share={self.text_heavy_share!r} is out of range; allowed: [0, 1]")
        if self.core is not None:
            if self.secondary is None or self.refresh_every is None:
                raise ValueError("core is set but secondary or refresh_every is None; allowed: core only with both")
            if self.core > self.secondary:
                raise ValueError(f"core={self.core!r} exceeds secondary={self.secondary!r}; allowed: core <= secondary")
        elif self.refresh_every is not None:
            raise ValueError("refresh_every is set but core is None; allowed: refresh_every only with core")

    def selects_image_rows(self) -> bool:
        return self.secondary is not None

    def image_counts(self, n_image: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.secondary is None:
            return None
        secondary = (n_image.to(torch.float64) * self.secondary).long()
        core = secondary if self.core is None else (n_image.to(torch.float64) * self.core).long()
        return secondary, core

    def eviction(self) -> Budget:
        if self.text_keep is None:
            return Budget()
        return Budget(ratio=self.text_keep, minimum=self.text_min_budget, heavy_share=self.text_heavy_share)

    def refresh_interval(self) -> int | None:
        return self.refresh_every

    def prune_keep(self, layer: int) -> float | None:
        return self.prefill_keep if layer == self.prefill_layer - 1 else None

    def scoring_queries(self, layout: PromptLayout) -> Tensor | None:
        return layout.modality == Modality.TEXT if self.text_keep is not None else None

    def check_layers(self, num_layers: int) -> None:
        if self.prefill_keep is not None and self.prefill_layer >= num_layers:
            raise ValueError(f"prefill_layer={self.prefill_layer} is out of range; allowed: [1, {num_layers - 1}]")

    @classmethod
    def from_release_flags(cls, **flags: Any) -> AVL:
        """The A-VL policy of the authors' release flags (`python -m lmms_eval --vision_adaptive_attention
        true ...`), under the release's own names and command-line defaults, e.g.
        `AVL.from_release_flags(vision_adaptive_attention=True, vision_adaptive_attention_rate=0.55)`.
        The table of flags, defaults and fields is `avl.cache.release_flags.RELEASE_FLAGS`."""
        from avl.cache.release_flags import release_fields

        return cls(**release_fields(flags))


@dataclass(frozen=True)
class FastV(Policy):
    """FastV with a KV cache: after prefill layer `layer - 1`, keep the hidden states of the top
    `int(keep * N_img)` image tokens (last prompt token's head-mean attention); decode then runs on
    the resulting (shorter) cache of the later layers.

    - layer: FastV's K.
    - keep: the share of image tokens KEPT, `1 - R`. FastV's R is the share pruned: its fastest
      setting, R=75%, is `keep=0.25`; the A-VL paper's FastV K2 R50 is `FastV(layer=2, keep=0.5)`.
    """

    layer: int = 2
    keep: float = 0.5

    def __post_init__(self) -> None:
        _check_count("layer", self.layer, 1)
        _check_ratio("keep", self.keep)

    def prune_keep(self, layer: int) -> float | None:
        return self.keep if layer == self.layer - 1 else None

    def check_layers(self, num_layers: int) -> None:
        if self.layer >= num_layers:
            raise ValueError(f"layer={self.layer} is out of range; allowed: [1, {num_layers - 1}]")


@dataclass(frozen=True)
class H2O(Policy):
    """Heavy-Hitter Oracle over all rows, per head, as the A-VL authors ran it: of the `len` rows
    seen, `int(budget * heavy_share * len)` heavy hitters (accumulated attention) and
    `int(budget * (1 - heavy_share) * len)` most recent rows are kept."""

    budget: float = 0.5
    heavy_share: float = 0.25

    def __post_init__(self) -> None:
        _check_ratio("budget", self.budget)
        if not 0.0 <= self.heavy_share <= 1.0:
            raise ValueError(f"heavy_share={self.heavy_share!r} is out of range; allowed: [0, 1]")

    def roles(self, layout: PromptLayout) -> Tensor:
        return torch.where(layout.valid, Role.EVICTABLE, Role.NONE)

    def eviction(self) -> Budget:
        return Budget(ratio=self.budget, heavy_share=self.heavy_share, split=True)

    def scoring_queries(self, layout: PromptLayout) -> Tensor | None:
        return layout.valid


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """Attention sinks: the first `sinks` rows plus a window of the `window` most recent rows
    (the original's `start_size` and `recent_size`).

    Prefill attends the whole prompt densely at its original positions; the cache then keeps the
    first `sinks` valid prompt rows and the last `window` of the others. Each decode step attends
    those rows plus the new token (`sinks + window + 1` rows once the window is full) and then
    drops the oldest window row, as the original's `StartRecentKVCache` called after each step.

    `positions` sets the rotary positions of decode:

    - "shifted" (default, the original's pos_shift): each step attends the cached rows at their
      index inside the cache, sinks then window rows in order (0, 1, ..., n - 1 for the n cached
      rows, the new token's key at n), and the query at n, the cache length. Distances never
      exceed `sinks + window`, however long the generation. The original caches unrotated keys and
      rotates them all every step; avl gets the same scores by rotating the query, the new key and
      the sinks only (`LayerCache.shift`), so a step costs what "original" does.
    - "original": keys are rotated once at their original positions and the query at its own
      (prompt length + step), so distances grow with the generation, as in the uncompressed model.

    A prompt with fewer than `sinks` valid rows pins all of them; the original would also pin the
    first generated tokens up to `sinks` (avl's sinks are prompt rows only).
    """

    sinks: int = 4
    window: int = 256
    positions: str = "shifted"

    def __post_init__(self) -> None:
        _check_count("sinks", self.sinks, 0)
        _check_count("window", self.window, 1)
        if self.positions not in ("shifted", "original"):
            raise ValueError(f"positions={self.positions!r} is not a StreamingLLM position rule; allowed: 'shifted' "
                             "(the original's pos_shift: positions inside the cache) or 'original' (the rows' own)")

    def roles(self, layout: PromptLayout) -> Tensor:
        order = layout.valid.long().cumsum(-1)  # 1-based rank among valid rows
        roles = torch.where(order <= self.sinks, Role.PINNED, Role.EVICTABLE)
        return roles.masked_fill(~layout.valid, Role.NONE)

    def eviction(self) -> Budget:
        return Budget(fixed=self.window)

    def shifts_positions(self) -> bool:
        return self.positions == "shifted"


def build_layer_cache(
    policy: Policy,
    layout: PromptLayout,
    k: Tensor,
    v: Tensor,
    n_image: Tensor,
    image_scores: Tensor | None,
    evict_scores: Tensor | None,
    new_tokens: int,
    prompt_keep: Tensor | None = None,
) -> LayerCache:
    """Compact one layer's prefill K/V [B, Hkv, L, D] (keys rotated at the layout's positions) into
    its `LayerCache`.

    image_scores [B, L]: head-mean attention of the last prompt token (needed when the policy
    selects image rows); evict_scores [B, Hkv, L]: attention received from the scoring queries;
    prompt_keep [B, Hkv, L]: the policy's per-head choice of evictable rows (`Policy.prompt_keep`).
    `new_tokens` sizes the evictable region for the whole generation: a head holds at most what it
    kept plus one row per decode step, and at most what the budget allows.
    """
    b, heads, _, _ = k.shape
    roles = policy.roles(layout)
    image = roles == Role.IMAGE
    counts = policy.image_counts(n_image)
    if counts is None:
        secondary = core_count = image.sum(-1)
        image_scores = torch.zeros(layout.modality.shape, dtype=torch.float32, device=k.device)
    else:
        secondary, core_count = (torch.minimum(c, image.sum(-1)) for c in counts)
    kept_image = top_rows(image_scores, image, secondary)
    core_image = top_rows(image_scores, kept_image, core_count)

    pinned_rows = packed_index(roles == Role.PINNED)  # [B, A]
    vision_rows = core_first(kept_image, core_image)  # [B, Nv]
    pinned_index = torch.cat([pinned_rows, vision_rows], dim=1)  # [B, A + Nv] token index per slot
    n_pinned = pinned_rows.shape[1]

    evictable = roles == Role.EVICTABLE
    evict_rows = packed_index(evictable, min_width=1)[:, None].expand(-1, heads, -1)  # [B, Hkv, E0]
    present = evict_rows >= 0
    entry = (evictable.long().cumsum(-1) - 1).clamp(min=0)  # [B, L] entry number among the evictable rows
    order = entry[:, None].expand(-1, heads, -1).gather(2, evict_rows.clamp(min=0))
    score_dtype = compute_dtype(k.dtype)
    if evict_scores is None:
        score = torch.zeros(present.shape, dtype=score_dtype, device=k.device)
    else:
        score = evict_scores.to(score_dtype).gather(2, evict_rows.clamp(min=0))
    seen = present[:, 0].sum(-1)  # [B]
    budget = policy.eviction()
    keep = present
    if prompt_keep is not None:
        keep = keep & prompt_keep.gather(2, evict_rows.clamp(min=0))
    if budget.evicts:
        keep = keep_heavy_and_recent(keep, order, score, *budget.counts(seen))
    # one spare slot: a step's width then never spans the whole region, which compiled decode would
    # otherwise trace as a separate graph (a slice covering its tensor is specialised)
    held = keep.sum(-1).amax(-1).tolist()  # [B] the largest head's kept rows
    capacity = max(min(budget.capacity(int(s) + new_tokens), h + new_tokens) for s, h in zip(seen, held)) + 1
    grow = max(capacity - present.shape[2], 0)
    keep, evict_rows, order, score = (F.pad(x, (0, grow), value=fill) for x, fill in
                                      ((keep, False), (evict_rows, -1), (order, 0), (score, 0.0)))
    slot_order = (~keep).to(torch.int8).argsort(dim=-1, stable=True)[:, :, :capacity]  # kept rows first
    live = keep.gather(2, slot_order)  # [B, Hkv, E]
    evict_index = evict_rows.gather(2, slot_order).masked_fill(~live, -1)

    def rows_of(x: Tensor, index: Tensor) -> Tensor:  # x [B, Hkv, L, D], index [B, Hkv, S] -> [B, Hkv, S, D]
        picked = x.gather(2, index.clamp(min=0)[..., None].expand(-1, -1, -1, x.shape[-1]))
        return picked.masked_fill((index < 0)[..., None], 0.0)

    pinned_index_h = pinned_index[:, None].expand(-1, heads, -1)
    slots = torch.cat([pinned_index_h, evict_index], dim=2)
    slot_ids = torch.arange(pinned_index.shape[1], device=k.device)[None].expand(b, -1)
    system = torch.where(pinned_rows >= 0, slot_ids[:, :n_pinned], -1)
    vision = torch.where(vision_rows >= 0, slot_ids[:, n_pinned:], -1)
    core_width = int(core_count.max()) if core_count.numel() else 0
    core = torch.where(slot_ids[:, :core_width] < core_count[:, None], vision[:, :core_width], -1)
    layer = LayerCache(
        k=rows_of(k, slots),
        v=rows_of(v, slots),
        system=system,
        vision=vision,
        core=core,
        core_count=core_count,
        live=live,
        order=order.gather(2, slot_order),
        score=score.gather(2, slot_order),
        seen=seen,
        used=layout.valid.sum() * heads,  # the prefill's last row attended every valid prompt row
        budget=budget,
    )
    if policy.shifts_positions():
        check_cache_positions(layout, roles == Role.PINNED, evictable, entry)
        layer.pinned_k = layer.k[:, :, :pinned_index.shape[1]].clone()
    return layer


def check_cache_positions(layout: PromptLayout, pinned: Tensor, evictable: Tensor, entry: Tensor) -> None:
    """A shifted cache (`LayerCache.shift`) needs the prompt's rows at their index inside the cache:
    pinned rows (pinned [B, L]) first, then the evictable rows by entry number (entry [B, L])."""
    rank = pinned.long().cumsum(-1) - 1
    index = torch.where(pinned, rank, pinned.sum(-1, keepdim=True) + entry)
    cached = pinned | evictable
    if not torch.equal(layout.positions[cached], index[cached]):
        raise ValueError("shifted positions (StreamingLLM's pos_shift) need the prompt's positions to be "
                         "0, 1, ... over its cached rows, pinned rows first; this prompt's are not "
                         "(a prefill drop or a family's own position rule): use positions='original'")


def core_first(kept: Tensor, core: Tensor) -> Tensor:
    """Row numbers of the kept rows [B, L] -> [B, max kept], the core rows first, then the other
    kept rows, each in row order; -1 after a sample's last kept row. The core then occupies the
    cache's first vision slots, which a core step reads as one block (`LayerCache.refresh_core`
    keeps it there)."""
    rows = kept.shape[1]
    row = torch.arange(rows, device=kept.device)
    key = torch.where(core, row, torch.where(kept, rows + row, 2 * rows))
    width = int(kept.sum(-1).max()) if kept.numel() else 0
    ordered = key.sort(dim=-1).values[:, :width]
    return torch.where(ordered < 2 * rows, ordered % rows, -1)


def split_policy(policy: Policy | FeaturePolicy) -> tuple[Policy, FeaturePolicy | None]:
    """A policy named alone (the CLI's `--policy`, an eval config) as `generate`'s `(policy, feature_policy)`:
    a feature policy (Trim) runs beside the full sequence cache."""
    if isinstance(policy, FeaturePolicy):
        return Full(), policy
    return policy, None
