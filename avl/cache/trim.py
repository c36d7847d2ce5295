"""Trimmed Llama: prune the image features of a cross-attention LVLM once, then reuse the kept set.

Lee et al., "Efficient LLaMA-3.2-Vision by Trimming Cross-attended Visual Features" (CVPR 2025
ELVM workshop). In Llama-3.2-Vision the image lives in the cross-attention layers' K/V, one row
per vision feature (4 tiles x 1601 = 6404 rows per image), which dwarfs the text KV. Cross-attention
maps are sparse and consistent across layers, so the features are scored ONCE, at the first
cross-attention layer, from the text queries' attention probabilities; only the top features are
kept, and every cross-attention layer (the first included, for decode) computes its K/V from the
kept features only. Training-free; about half the features keep benchmark parity. (The first
cross-attention layer's own prompt pass still attends every feature: its probabilities are the score.)

`Trim` is a `Policy`: its text-side questions (roles, eviction budget, refresh) are answered by
`text` (default `Full()`), so it combines with A-VL's text H2O part on the self-attention layers,
`Trim(keep=0.5, text=AVL(text_keep=0.5))`. Decoder-only models (LLaVA) call
`policy.check_layers`, which for `Trim` always raises: they have no cross-attention layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from avl.cache.layout import PromptLayout, top_rows
from avl.cache.modal_cache import Budget
from avl.cache.policies import Full, Policy

CRITERIA = ("sum", "head_union")


@dataclass(frozen=True)
class Trim(Policy):
    """Trim the cross-attended image features (Trimmed Llama), optionally with a text policy.

    - keep: share of each sample's image feature rows kept (padding tiles never count), in (0, 1].
      `int(keep * n_rows)` rows, at least one. `keep=1.0` trims nothing: the cache is the full
      model's, exactly.
    - criterion: how rows are scored from the first cross-attention layer's probabilities of the
      text queries (every prompt row that may attend the image; fully masked rows and left padding
      do not vote):
      "sum": summed over heads and queries; the top `int(keep * n_rows)` rows are kept;
      "head_union": per query head, summed over queries; each head keeps its own top
      `int(keep * n_rows)` rows and the union is kept, so the kept share adapts to how much
      the heads disagree (at least `keep`, at most `min(1, heads * keep)`), as in the paper.
    - text: the policy of the self-attention layers' text cache (Full, `AVL(text_keep=...)`, H2O,
      StreamingLLM). Policies that select image rows of the sequence (`AVL(secondary=...)`) or
      drop hidden states (FastV, `AVL(prefill_keep=...)`) do not apply to a cross-attention model.
    """

    keep: float = 0.5
    criterion: str = "sum"
    text: Policy = field(default_factory=Full)

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep!r} is out of range; allowed: a ratio in (0, 1]")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} is not supported; allowed: {list(CRITERIA)}")
        if not isinstance(self.text, Policy) or isinstance(self.text, Trim):
            raise ValueError(f"text={self.text!r} is invalid; allowed: a text-side Policy "
                             "(Full, AVL, H2O, StreamingLLM)")
        if self.text.selects_image_rows():
            raise ValueError(
                f"text={self.text!r} selects image rows of the sequence (secondary/core); a cross-attention model "
                "keeps its image in the cross-attention K/V, which Trim trims: leave secondary/core unset"
            )

    @property
    def trims(self) -> bool:
        """Whether any feature row is dropped (`keep < 1`)."""
        return self.keep < 1.0

    # Text-side questions go to `text`, on the self-attention layers.
    def roles(self, layout: PromptLayout) -> Tensor:
        return self.text.roles(layout)

    def selects_image_rows(self) -> bool:
        return self.text.selects_image_rows()

    def image_counts(self, n_image: Tensor) -> tuple[Tensor, Tensor] | None:
        return self.text.image_counts(n_image)

    def eviction(self) -> Budget:
        return self.text.eviction()

    def refresh_interval(self) -> int | None:
        return self.text.refresh_interval()

    def prune_keep(self, layer: int) -> float | None:
        return self.text.prune_keep(layer)

    def scoring_queries(self, layout: PromptLayout) -> Tensor | None:
        return self.text.scoring_queries(layout)

    def needs_image_scores(self, layer: int) -> bool:
        return self.text.needs_image_scores(layer)

    def check_layers(self, num_layers: int) -> None:
        """Called by decoder-only models (`CachedDecoder`): they have no cross-attention layers."""
        raise ValueError(
            f"{self!r} trims the image features of cross-attention layers, but this model has none (its image "
            "tokens are in the sequence, e.g. LLaVA); use Trim with Llama-3.2-Vision (model_type 'mllama'), or "
            "AVL / FastV for decoder-only models"
        )


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
