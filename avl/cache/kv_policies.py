"""KV-side policies pinned to NVIDIA kvpress 0.5.5: SnapKV, PyramidKV, AdaKV, KNorm,
ObservedAttention and RandomEviction.

Each compresses every layer's prompt cache once, after that layer's prefill attention, and never
evicts during decode (kvpress's behaviour: `Budget()`, every generated row kept). After each
prefill layer's attention the cache calls `prompt_keep(layer, num_layers, q, k, valid, scale)`,
which returns the keep mask [B, Hkv, L] over the prompt rows (False on left padding); every valid
prompt row is evictable, none pinned (kvpress protects none). Heads may keep different counts
(AdaKV) and layers different counts (PyramidKV): the cache's evictable region is as wide as the
batch's largest head count plus the generation, a head's other slots are empty.
`keep` is the share of prompt rows kept, kvpress's `1 - compression_ratio`. The rules themselves
are the functions of `avl.cache.scorers`; a scorer policy's `scores` is what AdaKV ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from avl.cache.layout import PromptLayout
from avl.cache.policies import Policy, Role
from avl.cache.scorers import (adakv_keep, kept_mask, knorm_scores, lengths_of, observed_attention_scores,
                               pyramidkv_budget, random_scores, snapkv_scores, topk_mask)


def _check_keep(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"keep={value!r} is out of range; allowed: a number in (0, 1], the share of prompt rows kept")


def _every_row(valid: Tensor, kv_heads: int) -> Tensor:
    """The mask of a policy that keeps everything: kvpress returns before scoring at ratio 0."""
    return valid[:, None].expand(-1, kv_heads, -1).clone()


def _check_int(name: str, value: object, minimum: int, odd: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (odd and value % 2 == 0):
        kind = "an odd integer" if odd else "an integer"
        raise ValueError(f"{name}={value!r} is out of range; allowed: {kind} >= {minimum}")


@dataclass(frozen=True)
class PrefillCompression(Policy):
    """Base of the kvpress-pinned policies: every valid prompt row evictable, chosen once per layer
    by `prompt_keep`, and no eviction in decode (the base `Budget()`)."""

    def roles(self, layout: PromptLayout) -> Tensor:
        return torch.where(layout.valid, Role.EVICTABLE, Role.NONE)


@dataclass(frozen=True)
class PromptCompression(PrefillCompression):
    """Base of the scorer policies: `keep` and what `prompt_keep` returns for each layer."""

    keep: float = 0.5

    def __post_init__(self) -> None:
        _check_keep(self.keep)

    def prompt_keep(self, layer: int, num_layers: int, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        """Keep mask [B, Hkv, L] of prefill `layer`'s prompt rows, from its q [B, Hq, L, D] (rotary
        applied), k [B, Hkv, L, D], valid [B, L] (left padding) and attention scale."""
        if self.keep == 1.0:
            return _every_row(valid, k.shape[1])
        return kept_mask(self.scores(q, k, valid, scale), self.keep, valid)

    def scores(self, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        """The rows' scores [B, Hkv, L] (higher = kept; -inf on padding)."""
        raise NotImplementedError


@dataclass(frozen=True)
class SnapKV(PromptCompression):
    """SnapKV: scores from the attention of the last `window_size` prompt queries, pooled with
    `kernel_size`; the window is kept first (`scorers.snapkv_scores`). Each head keeps
    `max(1, int(keep * L))` rows. Prompts must be longer than the window."""

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("window_size", self.window_size, 1)
        _check_int("kernel_size", self.kernel_size, 1, odd=True)

    def scores(self, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        return snapkv_scores(q, k, valid, scale, self.window_size, self.kernel_size)


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV's scores with per-layer budgets falling linearly from the first layer to
    the last, steepness `beta`, the same total as SnapKV (`scorers.pyramidkv_budget`)."""

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("beta", self.beta, 1)

    def prompt_keep(self, layer: int, num_layers: int, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        if self.keep == 1.0:
            return _every_row(valid, k.shape[1])
        counts = [pyramidkv_budget(layer, num_layers, n, self.keep, self.window_size, self.beta)
                  for n in lengths_of(valid)]
        return topk_mask(self.scores(q, k, valid, scale), counts, valid)


@dataclass(frozen=True)
class KNorm(PromptCompression):
    """Keep the keys of smallest L2 norm (`scorers.knorm_scores`)."""

    def scores(self, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        return knorm_scores(k, valid)


@dataclass(frozen=True)
class ObservedAttention(PromptCompression):
    """kvpress's ObservedAttention: keep the rows with the highest mean attention received from the
    prompt queries (`scorers.observed_attention_scores`; how it differs from `H2O` is said there)."""

    def scores(self, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        return observed_attention_scores(q, k, valid, scale)


@dataclass(frozen=True)
class RandomEviction(PromptCompression):
    """kvpress's RandomPress with a seed: rows ranked by `torch.rand` (`scorers.random_scores`)."""

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("seed", self.seed, 0)

    def scores(self, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        return random_scores(k, valid, self.seed)


@dataclass(frozen=True)
class AdaKV(PrefillCompression):
    """AdaKV over a scorer policy: the same total as the scorer's `keep`, spread unevenly across
    heads, each head keeping at least `alpha_safeguard` of its share (`scorers.adakv_keep`).
    Heads then hold different numbers of rows.

    Scorers: SnapKV, KNorm, RandomEviction. kvpress's AdaKV refuses ObservedAttention (it needs
    eager attention, which AdaKV's masking does not support); PyramidKV is refused here because
    AdaKV uses only the scorer's scores and `keep`, so its layer budgets would be silently ignored.
    """

    scorer: PromptCompression = field(default_factory=SnapKV)
    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.scorer, (SnapKV, KNorm, RandomEviction)) or isinstance(self.scorer, PyramidKV):
            raise ValueError(f"scorer={self.scorer!r} is not allowed; allowed: SnapKV, KNorm or RandomEviction")
        a = self.alpha_safeguard
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha_safeguard={a!r} is out of range; allowed: a number in [0, 1]")

    @property
    def keep(self) -> float:
        return self.scorer.keep

    def prompt_keep(self, layer: int, num_layers: int, q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
        """Keep mask [B, Hkv, L]; the count kept differs between heads."""
        if self.keep == 1.0:
            return _every_row(valid, k.shape[1])
        return adakv_keep(self.scorer.scores(q, k, valid, scale), self.keep, self.alpha_safeguard, valid)
