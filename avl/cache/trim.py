"""Trimmed Llama: prune the image features of a cross-attention LVLM once, then reuse the kept set.

Lee et al., "Efficient LLaMA-3.2-Vision by Trimming Cross-attended Visual Features" (CVPR 2025
ELVM workshop). In Llama-3.2-Vision the image lives in the cross-attention layers' K/V, one row
per vision feature (4 tiles x 1601 = 6404 rows per image), which dwarfs the text KV. Cross-attention
maps are sparse and consistent across layers, so the features are scored ONCE, at the first
cross-attention layer, from the text queries' attention probabilities; only the top features are
kept, and every cross-attention layer (the first included, for decode) computes its K/V from the
kept features only. Training-free; about half the features keep benchmark parity. (The first
cross-attention layer's own prompt pass still attends every feature: its probabilities are the score.)

`Trim` is a feature policy, not a sequence policy: it decides which image features enter the
cross-attention layers, and composes with any text-side sequence policy of the self-attention
layers, `generate(model, ..., policy=AVL(text_keep=0.5), feature_policy=Trim(keep=0.5))`.
Decoder-only models (LLaVA) have no cross-attention layers and reject it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from avl.cache.layout import top_rows
from avl.cache.policies import FeaturePolicy

CRITERIA = ("sum", "head_union")


@dataclass(frozen=True)
class Trim(FeaturePolicy):
    """Trim the cross-attended image features (Trimmed Llama).

    - keep: share of each sample's image feature rows, in (0, 1]; `n = int(keep * n_rows)` rows,
      at least one (padding tiles never count). `keep=1.0` trims nothing: the cache is the full
      model's, exactly.
    - criterion: how rows are scored from the first cross-attention layer's probabilities of the
      text queries (every prompt row that may attend the image; fully masked rows and left padding
      do not vote):
      "head_union" (default, the authors' rule): per query head, summed over queries, each head
      keeps its own top `n` rows and the union is kept; `keep` is then the per-head share and the
      kept share adapts to how much the heads disagree (at least `keep`, at most
      `min(1, heads * keep)`; `cache.stats()` reports the rows actually kept);
      "sum": summed over heads and queries, the top `n` rows are kept, so `keep` is the exact kept
      share (the paper's Fig. 4a visualisation).
    """

    keep: float = 0.5
    criterion: str = "head_union"

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep!r} is out of range; allowed: a ratio in (0, 1]")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} is not supported; allowed: {list(CRITERIA)}")

    @property
    def trims(self) -> bool:
        """Whether any feature row is dropped (`keep < 1`)."""
        return self.keep < 1.0


def kept_counts(candidates: Tensor, keep: float) -> Tensor:
    """Rows kept per sample: `int(keep * n)` of its n candidate rows, at least one when n > 0.
    candidates [B, N] -> [B]."""
    n = candidates.sum(-1)
    return (n.double() * keep).long().clamp(min=1).minimum(n)


def select_features(probs: Tensor, candidates: Tensor, keep: float, criterion: str) -> Tensor:
    """The Trimmed-Llama selection: which feature rows survive.

    probs [B, Hq, R, N]: the first cross-attention layer's attention probabilities of the scoring
    query rows (rows that do not vote are all zero); candidates [B, N]: real feature rows.
    Returns the kept mask [B, N] (a subset of the candidates).
    """
    count = kept_counts(candidates, keep)  # [B]
    if criterion == "sum":
        return top_rows(probs.sum(dim=(1, 2)), candidates, count)
    if criterion == "head_union":
        per_head = top_rows(probs.sum(dim=2), candidates[:, None], count[:, None])  # [B, Hq, N]
        return per_head.any(dim=1)
    raise ValueError(f"criterion={criterion!r} is not supported; allowed: {list(CRITERIA)}")
