"""`ModalCache`: the typed KV cache of a generation, one `LayerCache` per decoder layer.

Slot layout of a layer's K/V buffers `[B, Hkv, slots, D]`:

    [ system rows | kept image rows (secondary) | evictable rows ]
      pinned: never evicted, shared by all heads  |  per head, budgeted

A decode step attends the system rows, the image rows of this step (the core set, or all
secondary rows on a refresh step) and the live evictable rows, through the gathered-attention
op; nothing is masked over a full-length cache. All shapes are fixed after prefill, so the
compiled decode step never changes shape: evictions flip `live` and reuse slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from avl.cache.layout import top_rows
from avl.ops import gathered_attention


@dataclass(frozen=True)
class Budget:
    """How many evictable rows survive a step, given the rows seen so far: heavy hitters (highest
    accumulated attention) plus the most recent rows.

    - `ratio` (A-VL text): total = max(round(ratio * seen) (half to even), minimum), of which
      floor(total * heavy_share) heavy and the rest recent;
    - `ratio` with `split=True` (the H2O baseline as its authors ran it): heavy =
      floor(ratio * heavy_share * seen) and recent = floor(ratio * (1 - heavy_share) * seen),
      each floored separately;
    - `fixed` (StreamingLLM): that many recent rows;
    - neither: no eviction.
    """

    ratio: float | None = None
    fixed: int | None = None
    minimum: int = 0
    heavy_share: float = 0.0
    split: bool = False

    @property
    def evicts(self) -> bool:
        return self.ratio is not None or self.fixed is not None

    def counts(self, seen: Tensor) -> tuple[Tensor, Tensor]:
        """(heavy, recent) rows to keep for `seen` [B] rows seen so far, each [B] int64."""
        if self.fixed is not None:
            return torch.zeros_like(seen), torch.full_like(seen, self.fixed)
        if self.ratio is None:
            return torch.zeros_like(seen), seen
        seen = seen.to(torch.float64)
        if self.split:
            heavy = (seen * self.ratio * self.heavy_share).floor()
            return heavy.long(), (seen * self.ratio * (1 - self.heavy_share)).floor().long()
        total = (seen * self.ratio).round().clamp(min=self.minimum)
        heavy = (total * self.heavy_share).floor()
        return heavy.long(), (total - heavy).long()

    def rows(self, seen: Tensor) -> Tensor:
        """Rows kept in total for `seen` [B] rows seen, [B]."""
        heavy, recent = self.counts(seen)
        return heavy + recent

    def capacity(self, seen_final: int) -> int:
        """Slots that hold the region through a generation ending with `seen_final` rows seen."""
        if not self.evicts:
            return seen_final
        return min(seen_final, int(self.rows(torch.tensor([seen_final]))[0]) + 1)


def keep_heavy_and_recent(live: Tensor, time: Tensor, score: Tensor, heavy: Tensor, recent: Tensor) -> Tensor:
    """H2O selection per head: the `recent` most recent live rows plus the `heavy` live rows with
    the highest score among the others. live/time/score [B, H, E], heavy/recent [B].
    Returns the keep mask [B, H, E]; keeps everything when the live count is within the sum."""
    keep_recent = top_rows(time.to(torch.float64), live, recent[:, None])  # positions are exact in float64
    return keep_recent | top_rows(score, live & ~keep_recent, heavy[:, None])


@dataclass
class LayerCache:
    """One decoder layer's cache. Index tensors hold slot numbers, -1 where a sample has fewer rows."""

    k: Tensor  # [B, Hkv, S, D]
    v: Tensor  # [B, Hkv, S, D]
    system: Tensor  # [B, A] slots always attended
    vision: Tensor  # [B, Nv] slots of the kept (secondary) image rows
    core: Tensor  # [B, Nc] slots of the core image rows, a subset of `vision`
    core_count: Tensor  # [B] core rows per sample
    live: Tensor  # [B, Hkv, E] evictable slot holds a row
    time: Tensor  # [B, Hkv, E] rotary position of that row (recency)
    score: Tensor  # [B, Hkv, E] accumulated attention received (heavy-hitter score)
    seen: Tensor  # [B] rows that ever entered the evictable region
    used: Tensor  # [] head-rows attended in the last decode step (for stats)

    @property
    def evictable_start(self) -> int:
        return self.k.shape[2] - self.live.shape[2]

    def indices(self, refresh: bool) -> Tensor:
        """Slots to attend this step, [B, Hkv, M] int32 (-1 = skip)."""
        heads = self.live.shape[1]
        image = self.vision if refresh else self.core
        pinned = torch.cat([self.system, image], dim=1)[:, None].expand(-1, heads, -1)
        slots = torch.arange(self.evictable_start, self.k.shape[2], device=self.k.device)
        evictable = torch.where(self.live, slots, -1)
        return torch.cat([pinned, evictable], dim=2).to(torch.int32)

    def append(self, k_new: Tensor, v_new: Tensor, position: Tensor) -> None:
        """Write the new token's k/v [B, Hkv, 1, D] into the first free evictable slot of each head.

        The region was sized at prefill for the generation's `new_tokens`; it always has a free slot then.
        """
        b, heads = self.live.shape[:2]
        free = (~self.live).int().argmax(dim=-1)  # [B, Hkv]
        batch = torch.arange(b, device=free.device)[:, None]
        head = torch.arange(heads, device=free.device)[None, :]
        # advanced-index writes (index_put_): on CPU far faster than scatter_ for half types
        self.k[batch, head, free + self.evictable_start] = k_new[:, :, 0]
        self.v[batch, head, free + self.evictable_start] = v_new[:, :, 0]
        self.live[batch, head, free] = True
        self.time[batch, head, free] = position[:, None]
        self.score[batch, head, free] = 0.0
        self.seen.add_(1)

    def evict(self, budget: Budget) -> None:
        """Drop evictable rows over the budget (after the step's attention)."""
        keep = keep_heavy_and_recent(self.live, self.time, self.score, *budget.counts(self.seen))
        self.live.copy_(keep)

    def refresh_core(self, image_probs: Tensor) -> None:
        """Re-rank the core set from this step's head-mean probabilities over `vision` [B, Nv]."""
        ranked = image_probs.masked_fill(self.vision < 0, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        width = self.core.shape[1]
        core = self.vision.gather(1, ranked[:, :width])
        taken = torch.arange(width, device=core.device)[None, :] < self.core_count[:, None]
        self.core.copy_(torch.where(taken, core, -1))

    def bytes_per_head_row(self) -> int:
        return 2 * self.k.shape[-1] * self.k.element_size()

    def stored_head_rows(self) -> int:
        pinned = (torch.cat([self.system, self.vision], dim=1) >= 0).sum() * self.live.shape[1]
        return int(pinned + self.live.sum())

    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass(frozen=True)
class LayerStats:
    """Rows are counted per sample and KV head, divided by the heads: a row is one token's K and V.
    `kind` is "self" for a self-attention layer, "cross" for a cross-attention (image) layer."""

    kind: str
    stored_rows: float
    stored_bytes: int
    allocated_bytes: int
    used_rows: float
    used_bytes: int
    full_rows: int
    full_bytes: int


@dataclass(frozen=True)
class CacheStats:
    """Cache accounting of a generation: per layer and in total, against the uncompressed cache."""

    layers: list[LayerStats]

    @property
    def total(self) -> LayerStats:
        return self.sum("total", self.layers)

    def total_of(self, kind: str) -> LayerStats:
        """Sum over the layers of one kind ("self" or "cross")."""
        return self.sum(kind, [s for s in self.layers if s.kind == kind])

    @staticmethod
    def sum(kind: str, layers: list[LayerStats]) -> LayerStats:
        numbers = [f.name for f in fields(LayerStats) if f.name != "kind"]
        return LayerStats(kind, *(sum(getattr(s, name) for s in layers) for name in numbers))

    def table(self) -> str:
        """A plain-text table: one line per layer and the totals, with % of the full cache."""
        head = (f"{'layer':>9} {'stored rows':>12} {'stored MB':>10} {'%full':>6} {'used rows':>10} {'used MB':>9}"
                f" {'%full':>6} {'full MB':>9}")
        kinds = sorted({s.kind for s in self.layers})
        rows = [(f"{'x' if s.kind == 'cross' else ''}{i}", s) for i, s in enumerate(self.layers)]
        if len(kinds) > 1:
            rows += [(f"{kind} all", self.total_of(kind)) for kind in kinds]
        lines = [head]
        for name, s in [*rows, ("total", self.total)]:
            full = max(s.full_bytes, 1)
            lines.append(
                f"{name:>9} {s.stored_rows:>12.1f} {s.stored_bytes / 2**20:>10.3f} {100 * s.stored_bytes / full:>6.1f}"
                f" {s.used_rows:>10.1f} {s.used_bytes / 2**20:>9.3f} {100 * s.used_bytes / full:>6.1f}"
                f" {s.full_bytes / 2**20:>9.3f}"
            )
        return "\n".join(lines)


@dataclass
class CrossLayerCache:
    """A cross-attention layer's K/V over the (possibly trimmed) image features, built once in prefill."""

    k: Tensor  # [B, Hkv, N, D]
    v: Tensor  # [B, Hkv, N, D]
    valid: Tensor  # [B, N] feature row present (False on padding tiles and trimmed rows)
    full_rows: Tensor  # [B] feature rows before trimming

    def stats(self) -> LayerStats:
        heads, per_row = self.k.shape[1], 2 * self.k.shape[-1] * self.k.element_size()
        rows, full = int(self.valid.sum()), int(self.full_rows.sum())
        allocated = self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return LayerStats("cross", rows, rows * heads * per_row, allocated, rows, rows * heads * per_row,
                          full, full * heads * per_row)


@dataclass
class ModalCache:
    """The whole cache of a generation: per-layer caches and the decode position of each sample.

    `cross` holds the cross-attention layers' image K/V of cross-attention models (Llama-3.2-Vision),
    in layer order; it is empty for models that put image tokens in the sequence.
    """

    layers: list[LayerCache]
    next_position: Tensor  # [B] rotary position of the next token
    full_rows: Tensor  # [B] rows an uncompressed cache would hold now (prompt + generated tokens)
    cross: list[CrossLayerCache] = field(default_factory=list)

    def advance(self) -> None:
        """After a decode step: the next token is one position further, the full cache one row longer."""
        self.next_position.add_(1)
        self.full_rows.add_(1)

    def stats(self) -> CacheStats:
        out = []
        for layer in self.layers:
            heads, per_row = layer.live.shape[1], layer.bytes_per_head_row()
            stored, used = layer.stored_head_rows(), int(layer.used)
            full = int(self.full_rows.sum())
            out.append(LayerStats(
                kind="self", stored_rows=stored / heads, stored_bytes=stored * per_row, allocated_bytes=layer.allocated_bytes(),
                used_rows=used / heads, used_bytes=used * per_row, full_rows=full, full_bytes=full * heads * per_row,
            ))
        return CacheStats(out + [layer.stats() for layer in self.cross])


def attend(layer: LayerCache, q: Tensor, k_new: Tensor, v_new: Tensor, position: Tensor, refresh: bool,
           scale: float) -> tuple[Tensor, Tensor]:
    """Append the new token's k/v, then attend the selected rows: out [B, Hq, 1, D], probs [B, Hq, M]."""
    layer.append(k_new, v_new, position)
    idx = layer.indices(refresh)
    # the cache builds idx itself, always in range: skip the wrapper's range check (a device sync)
    out, probs = gathered_attention(q, layer.k, layer.v, idx, scale, validate=False)
    layer.used.copy_((idx >= 0).sum())
    return out, probs
