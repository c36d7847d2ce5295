"""`ModalCache`: the typed KV cache of a generation, one entry per decoder block.

A self-attention block has a `LayerCache`. Slot layout of its K/V buffers `[B, Hkv, slots, D]`:

    [ system rows | kept image rows (secondary) | evictable rows ]
      pinned: never evicted, shared by all heads  |  per head, budgeted

A decode step (`LayerCache.step`) appends the new row, attends the system rows, the image rows
of this step (the core set, or all secondary rows on a refresh step) and the evictable rows up to
the step's width, through the gathered-attention op, and then updates the policy's statistics.
What a step reads follows what is live:

- the core index is as wide as the batch's largest core count, not the secondary set, and the
  core rows occupy the first vision slots (a refresh swaps the rows that leave the core with those
  that enter it, `avl::swap_rows_`), so a core step reads them as one block, in place;
- the evictable region is attended, scored and evicted only up to `width`, the highest slot any
  row of the batch can occupy at this step. New rows take the first free slot, so occupied slots
  stay below the largest live count seen so far; the host knows that count without reading the
  device (`DecodePlan`), so the capacity sized at prefill for `max_new_tokens` costs nothing.

A policy that `shifts_positions` (StreamingLLM's pos_shift) has the cache hold unrotated keys: each
step rotates the rows it reads, `[pinned | evictable up to width]`, at their index inside the
cache and the query at the cache length, through the family's `Rotate` (never the whole capacity).

Buffers never change shape after prefill; `width` is a Python int that `torch.compile(dynamic=True)`
treats as one symbolic size, so compiled decode stays one graph per step kind (ordinary, refresh).
A cross-attention block (Llama-3.2-Vision) has a `CrossLayerCache`: image K/V built once in prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from avl.cache.layout import top_rows
from avl.ops import gathered_attention, swap_rows_

if TYPE_CHECKING:  # policies.py builds these caches, so it imports this module
    from avl.cache.policies import Policy


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

    Both counts grow by at most one per row seen, so a decode step evicts at most one row per head.
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


def keep_heavy_and_recent(live: Tensor, order: Tensor, score: Tensor, heavy: Tensor, recent: Tensor) -> Tensor:
    """H2O selection per head: the `recent` most recent live rows plus the `heavy` live rows with
    the highest score among the others (ties: the lower slot). live/order/score [B, H, E] (`order`:
    when the row entered, larger is more recent), heavy/recent [B].
    Returns the keep mask [B, H, E]; keeps everything when the live count is within the sum."""
    keep_recent = top_rows(order.to(torch.float64), live, recent[:, None])  # entry numbers are exact in float64
    return keep_recent | top_rows(score, live & ~keep_recent, heavy[:, None])


Rotate = Callable[[Tensor, Tensor, bool], Tensor]
"""`rotate(x, positions, query)`: x [B, H, N, D] rotated at integer positions [B, H, N] with the
family's rotary (`query`: x holds queries, which also take the family's query-only factor)."""


@dataclass
class LayerCache:
    """One self-attention layer's cache. Index tensors hold slot numbers, -1 where a sample has fewer rows."""

    k: Tensor  # [B, Hkv, S, D]
    v: Tensor  # [B, Hkv, S, D]
    system: Tensor  # [B, A] slots always attended
    vision: Tensor  # [B, Nv] slots of the kept (secondary) image rows
    core: Tensor  # [B, Nc] slots of the core image rows: the first `core_count` of `vision`; Nc = the largest core count
    core_count: Tensor  # [B] core rows per sample
    live: Tensor  # [B, Hkv, E] evictable slot holds a row
    order: Tensor  # [B, Hkv, E] entry number of that row in the evictable region (recency)
    score: Tensor  # [B, Hkv, E] accumulated attention received (heavy-hitter score)
    seen: Tensor  # [B] rows that ever entered the evictable region
    used: Tensor  # [] head-rows attended in the last step (the prefill's last row until a decode step ran)
    budget: Budget = field(default_factory=Budget)  # the policy's rule for the evictable rows
    # a shifted cache's pinned keys [B, Hkv, A + Nv, D] at their prompt positions (see `step`), else None
    pinned_k: Tensor | None = None
    # when set, called with (idx, probs) after each step's attention: eager runs only (`avl.analysis`)
    observer: Callable[[Tensor, Tensor], None] | None = field(default=None, repr=False, compare=False)

    @property
    def shifted(self) -> bool:
        """Positions inside the cache (StreamingLLM's pos_shift) instead of the rows' own."""
        return self.pinned_k is not None

    @property
    def evictable_start(self) -> int:
        return self.k.shape[2] - self.live.shape[2]

    def indices(self, refresh: bool, width: int) -> Tensor:
        """Slots to attend this step, [B, Hkv, A + (Nv if refresh else Nc) + width] int32 (-1 = skip)."""
        heads = self.live.shape[1]
        image = self.vision if refresh else self.core
        pinned = torch.cat([self.system, image], dim=1)[:, None].expand(-1, heads, -1)
        start = self.evictable_start
        slots = torch.arange(start, start + width, device=self.k.device)
        evictable = torch.where(self.live[..., :width], slots, -1)
        return torch.cat([pinned, evictable], dim=2).to(torch.int32)

    def step(self, q: Tensor, k_new: Tensor, v_new: Tensor, scale: float, refresh: bool, width: int,
             rotate: Rotate | None = None) -> Tensor:
        """One decode step of this layer: append the new row, attend, update the statistics.

        q [B, Hq, 1, D], k_new/v_new [B, Hkv, 1, D] -> out [B, Hq, 1, D]. `width` (from `DecodePlan`)
        bounds the evictable slots read; `refresh` attends all secondary rows and re-ranks the core.
        A `shifted` cache takes q and k_new unrotated and rotates them with `rotate` (`shift`).
        """
        if self.shifted:
            if rotate is None:
                raise ValueError("this layer cache rotates its rows at their positions inside it (a policy with "
                                 "shifted positions): step needs `rotate`, the family's rotary at given positions")
            position = self.entry_position()  # the new row's
            k_new = rotate(k_new, position[:, :, None].expand(-1, k_new.shape[1], 1), False)
        self.append(k_new, v_new, width)
        if self.shifted:
            q = self.shift(q, position, width, rotate)
        idx = self.indices(refresh, width)
        # the cache builds idx itself, always in range: skip the wrapper's range check (a device sync)
        out, probs = gathered_attention(q, self.k, self.v, idx, scale, validate=False)
        if self.observer is not None:
            self.observer(idx, probs)
        self.used.copy_((idx >= 0).sum())
        if self.budget.evicts:
            heads = self.live.shape[1]
            received = probs[:, :, probs.shape[2] - width:].unflatten(1, (heads, -1)).sum(2)  # [B, Hkv, width]
            self.score[..., :width].add_(received.to(self.score.dtype))
            self.evict_one(width)
        if refresh:
            start = self.system.shape[1]
            self.refresh_core(probs[:, :, start:start + self.vision.shape[1]].mean(1))
        return out

    def entry_position(self) -> Tensor:
        """[B, 1] position of the next row to enter the evictable region: the pinned rows come first,
        then the evictable rows by entry (the prompt's positions, 0, 1, ... over its valid rows)."""
        pinned = (torch.cat([self.system, self.vision], dim=1) >= 0).sum(-1, keepdim=True)
        return pinned + self.seen[:, None]

    def shift(self, q: Tensor, position: Tensor, width: int, rotate: Rotate) -> Tensor:
        """StreamingLLM's pos_shift after the append of the row at entry position `position` [B, 1]:
        the cache's rows in order (pinned rows by slot, then the live evictable rows by entry) at
        positions 0, 1, ..., n - 1 and the query, the newest row's, at n - 1. Returns q rotated so
        that, over the rows as stored, every score is the one those positions give.

        RoPE scores depend on position differences only. The evictable rows are stored once at
        their entry positions (`entry_position`) and the live ones are the most recent, so they
        sit `oldest` (the entry number of the oldest live row) above their positions inside the
        cache: the query is rotated at its position inside the cache (which also sets the family's
        query-only factor) and then by `oldest`, and the pinned rows, rotated at positions
        0..A+Nv-1 in `pinned_k`, are written back rotated by `oldest` too. The window is never
        re-rotated: a step rotates the query, the new key and the pinned rows."""
        count = self.live[..., :width].sum(-1)  # [B, Hkv] rows held, the new one included
        oldest = (self.seen[:, None] - count)[..., None]  # [B, Hkv, 1]
        query_pos = position[..., None] - oldest  # [B, Hkv, 1]
        groups = q.shape[1] // count.shape[1]
        q = rotate(q, query_pos.repeat_interleave(groups, dim=1), True)
        q = rotate(q, oldest.repeat_interleave(groups, dim=1), False)
        n_pinned = self.pinned_k.shape[2]
        if n_pinned:
            self.k[:, :, :n_pinned] = rotate(self.pinned_k, oldest.expand(-1, -1, n_pinned), False)
        return q

    def append(self, k_new: Tensor, v_new: Tensor, width: int) -> None:
        """Write the new token's k/v [B, Hkv, 1, D] into the first free evictable slot of each head,
        which lies below `width` (the plan guarantees it)."""
        b, heads = self.live.shape[:2]
        free = (~self.live[..., :width]).int().argmax(dim=-1)  # [B, Hkv]
        batch = torch.arange(b, device=free.device)[:, None]
        head = torch.arange(heads, device=free.device)[None, :]
        # advanced-index writes (index_put_): on CPU far faster than scatter_ for half types
        self.k[batch, head, free + self.evictable_start] = k_new[:, :, 0]
        self.v[batch, head, free + self.evictable_start] = v_new[:, :, 0]
        self.live[batch, head, free] = True
        self.order[batch, head, free] = self.seen[:, None]
        self.score[batch, head, free] = 0.0
        self.seen.add_(1)

    def evict_one(self, width: int) -> None:
        """Apply the budget after a step's attention: where a head holds more live rows than the
        budget, drop its lowest-score row outside the recent window (ties: the higher slot).

        The budget grows by at most one row per row seen, and every row of the recent window is
        live (the window never shrinks), so this equals `keep_heavy_and_recent` recomputed over all
        live rows, at O(width) per head instead of a sort."""
        heavy, recent = self.budget.counts(self.seen)  # [B]
        live, order, score = self.live[..., :width], self.order[..., :width], self.score[..., :width]
        over = live.sum(-1) > (heavy + recent)[:, None]  # [B, Hkv]
        old = live & (order < (self.seen - recent)[:, None, None])
        masked = score.masked_fill(~old, float("inf"))
        lowest = old & (masked == masked.amin(-1, keepdim=True))
        slots = torch.arange(1, width + 1, device=live.device)
        victim = (lowest * slots).argmax(-1, keepdim=True)  # the last slot among the lowest
        live.masked_fill_(over[..., None] & (slots - 1 == victim), False)

    def refresh_core(self, image_probs: Tensor) -> None:
        """Re-rank the core set from this step's head-mean probabilities over `vision` [B, Nv]
        (ties: the earlier vision slot) and move it to the front of the vision slots: each row
        that leaves the core swaps places (K and V, every head) with one that enters it, so the
        core stays the first `core_count` vision slots and a core step reads them as one block."""
        n_vision, width = self.vision.shape[1], self.core.shape[1]
        if width == 0 or width == n_vision:
            return  # the core is every secondary row: nothing can enter or leave
        ranked = image_probs.masked_fill(self.vision < 0, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        position = torch.arange(n_vision, device=self.vision.device)
        chosen = ranked.argsort(dim=-1) < self.core_count[:, None]  # [B, Nv] positions of the new core
        current = position < self.core_count[:, None]

        def slots_where(mask: Tensor) -> Tensor:  # [B, width] vision slots of mask's positions, in order; -1 after
            at = torch.where(mask, position, n_vision).sort(dim=-1).values[:, :width]
            return torch.where(at < n_vision, self.vision.gather(1, at.clamp(max=n_vision - 1)), -1)

        swap_rows_(self.k, self.v, slots_where(current & ~chosen), slots_where(chosen & ~current))

    def live_rows(self) -> Tensor:
        """The largest live count over the heads of each sample, [B]."""
        return self.live.sum(-1).amax(-1)

    def occupied_width(self) -> int:
        """1 + the highest occupied evictable slot of the batch (0 if none); reads the device."""
        slots = torch.arange(1, self.live.shape[2] + 1, device=self.live.device)
        return int((self.live * slots).amax()) if self.live.numel() else 0

    def bytes_per_head_row(self) -> int:
        return 2 * self.k.shape[-1] * self.k.element_size()

    def stored_head_rows(self) -> int:
        pinned = (torch.cat([self.system, self.vision], dim=1) >= 0).sum() * self.live.shape[1]
        return int(pinned + self.live.sum())

    def allocated_bytes(self) -> int:
        held = [self.k, self.v] if self.pinned_k is None else [self.k, self.v, self.pinned_k]
        return sum(x.numel() * x.element_size() for x in held)


@dataclass(frozen=True)
class LayerStats:
    """Rows are counted per sample and KV head, divided by the heads: a row is one token's K and V.
    `kind` is "self" for a self-attention layer, "cross" for a cross-attention (image) layer.
    `used` is what the last step attended: the last decode step, or the prefill's last prompt row
    when no decode step ran (the first token was EOS, or `max_new_tokens=1`)."""

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
    """Cache accounting of a generation: per layer and in total, against the uncompressed cache.
    `decode_steps`: decode steps run (0: the `used` columns are the prefill's last row)."""

    layers: list[LayerStats]
    decode_steps: int = 0

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
        used = "used rows" if self.decode_steps else "used@pre"
        head = (f"{'layer':>9} {'stored rows':>12} {'stored MB':>10} {'%full':>6} {used:>10} {'used MB':>9}"
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
        if not self.decode_steps:
            lines.append("no decode step ran: 'used' is what the prefill's last prompt row attended")
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


@dataclass(frozen=True)
class DecodeStep:
    """What a decode step needs from the host: whether it is a refresh step, and per block the
    evictable width its `LayerCache.step` reads (0 for cross-attention blocks)."""

    refresh: bool
    widths: tuple[int, ...]


class DecodePlan:
    """Host-side bookkeeping of the decode steps a cache allows: counts the steps, raises past
    the capacity sized at prefill, and tracks each layer's live high-water mark without reading
    the device (one read at prefill).

    Per self-attention layer it keeps the largest live count of each sample: a step adds one row
    and the budget then keeps `min(rows, budget.rows(seen))`. New rows take the first free slot,
    so occupied slots stay below the largest live count reached: that is the step's width.
    """

    def __init__(self, layers: list[LayerCache | CrossLayerCache | None], budget: Budget, new_tokens: int,
                 refresh_every: int | None) -> None:
        self.budget, self.new_tokens, self.refresh_every = budget, new_tokens, refresh_every
        self.steps = 0
        self._blocks = [i for i, layer in enumerate(layers) if isinstance(layer, LayerCache)]
        self._n_blocks = len(layers)
        caches = [layers[i] for i in self._blocks]
        if caches:
            self._live = torch.stack([c.live_rows() for c in caches]).cpu()  # [layers, B]
            self._seen = caches[0].seen.cpu().clone()  # [B]: every layer sees the same evictable rows
            self._width = torch.tensor([c.occupied_width() for c in caches])  # [layers]

    def next(self) -> DecodeStep:
        """Plan the next decode step. Raises ValueError past the `new_tokens` the cache was sized for."""
        if self.steps >= self.new_tokens:
            raise ValueError(f"decode step {self.steps + 1} is past the capacity of this cache: prefill sized it for "
                             f"new_tokens={self.new_tokens} decode steps; prefill again with a larger new_tokens")
        self.steps += 1
        widths = [0] * self._n_blocks
        if self._blocks:
            self._seen += 1
            grown = self._live + 1  # rows held right after this step's append
            self._width = torch.maximum(self._width, grown.amax(-1))
            for block, width in zip(self._blocks, self._width.tolist()):
                widths[block] = width
            self._live = torch.minimum(grown, self.budget.rows(self._seen)) if self.budget.evicts else grown
        refresh = self.refresh_every is not None and self.steps % self.refresh_every == 0
        return DecodeStep(refresh, tuple(widths))


@dataclass
class ModalCache:
    """The whole cache of a generation: one entry per decoder block (a `LayerCache` for
    self-attention, a `CrossLayerCache` for cross-attention, None for a cross-attention block that
    has no image to attend), the policy it was built for, and the decode position of each sample.

    `rotary_state` is a family's per-sample rotary state that decode needs besides the position
    (Qwen-VL: the dynamic-NTK alpha of the prompt, [B] float64); None for the others.
    """

    layers: list[LayerCache | CrossLayerCache | None]
    policy: Policy  # the policy the cache was built for
    next_position: Tensor  # [B] original position of the next token (the rotary one unless positions are shifted)
    full_rows: Tensor  # [B] rows an uncompressed cache would hold now (prompt + generated tokens)
    new_tokens: int  # decode steps the capacity was sized for
    rotary_state: Tensor | None = None
    plan: DecodePlan = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.plan = DecodePlan(self.layers, self.policy.eviction(), self.new_tokens, self.policy.refresh_interval())

    @property
    def self_layers(self) -> list[LayerCache]:
        return [layer for layer in self.layers if isinstance(layer, LayerCache)]

    @property
    def cross(self) -> list[CrossLayerCache]:
        """The cross-attention layers' image caches, in layer order (empty for decoder-only models)."""
        return [layer for layer in self.layers if isinstance(layer, CrossLayerCache)]

    def repeat_interleave(self, times: int) -> ModalCache:
        """Each sample's cache repeated `times` times (sample b becomes rows b*times .. b*times + times-1):
        several continuations of one prefill, e.g. sampling, or a batch of equal prompts in benchmarks.
        The repeat shares no storage with this cache and allows the decode steps this one has left."""
        def rep(x: object) -> object:
            return x.repeat_interleave(times, dim=0) if isinstance(x, Tensor) and x.dim() else (
                x.clone() if isinstance(x, Tensor) else x)

        def rep_layer(layer: LayerCache | CrossLayerCache | None) -> LayerCache | CrossLayerCache | None:
            return None if layer is None else type(layer)(**{f.name: rep(getattr(layer, f.name)) for f in fields(layer)})

        out = ModalCache([rep_layer(layer) for layer in self.layers], self.policy, rep(self.next_position),
                         rep(self.full_rows), self.new_tokens - self.plan.steps, rep(self.rotary_state))
        return out

    def next_step(self) -> DecodeStep:
        """The host-side plan of the next decode step (pass it to `model.decode` when compiled)."""
        return self.plan.next()

    def advance(self) -> None:
        """After a decode step: the next token is one position further, the full cache one row longer."""
        self.next_position.add_(1)
        self.full_rows.add_(1)

    def stats(self) -> CacheStats:
        out = []
        for layer in self.self_layers:
            heads, per_row = layer.live.shape[1], layer.bytes_per_head_row()
            stored, used = layer.stored_head_rows(), int(layer.used)
            full = int(self.full_rows.sum())
            out.append(LayerStats(
                kind="self", stored_rows=stored / heads, stored_bytes=stored * per_row, allocated_bytes=layer.allocated_bytes(),
                used_rows=used / heads, used_bytes=used * per_row, full_rows=full, full_bytes=full * heads * per_row,
            ))
        return CacheStats(out + [layer.stats() for layer in self.cross], decode_steps=self.plan.steps)
