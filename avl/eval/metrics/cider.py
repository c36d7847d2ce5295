"""CIDEr-D, computed as pycocoevalcap's ``Cider`` does (the scorer lmms-eval uses for NoCaps and
Flickr30k captioning).

Sources: Vedantam et al., "CIDEr: Consensus-based Image Description Evaluation" (CVPR 2015),
section on CIDEr-D; and pycocoevalcap 1.2 ``cider/cider.py`` + ``cider/cider_scorer.py``, whose
exact arithmetic this module follows:

* Inputs are pre-tokenised strings (tokens separated by whitespace); in lmms-eval they come out
  of the PTB tokenizer (see :mod:`avl.eval.metrics.ptb_tokenize`).
* n-grams of order 1..n (``n = 4``) with their counts, per caption.
* Document frequency ``df(g)``: the number of *images* whose reference set contains ``g``
  (computed on the evaluated split only; candidates do not contribute). The idf weight of an
  n-gram is ``log(N_images) - log(max(1, df(g)))``.
* Per n-gram order, the tf-idf vectors are ``count * idf``. The similarity of candidate ``c``
  to reference ``r`` at order ``k`` is ``sum_g min(c_g, r_g) * r_g / (|c| * |r|)`` over the
  candidate's n-grams, where the ``min`` clips the candidate's tf-idf by the reference's (the
  "-D" clipping), and the division is skipped when either norm is 0.
* Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))``, ``sigma = 6``, applied at every
  order. Quirk kept from pycocoevalcap: the length ``l`` is the number of *bigrams*
  (``max(0, words - 1)``), not of words; the two differ only when a caption is empty or
  has one word. With ``n = 1`` there are no bigrams and the penalty is always 1.
* Image score: mean over orders, mean over references, times 10. Corpus score: mean over
  images. lmms-eval reports this corpus score as-is (papers usually print it times 100).

With a single image every n-gram has idf 0 and every score is 0, as in pycocoevalcap.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["CiderResult", "cider_d", "ngram_counts"]

K = TypeVar("K", bound=Hashable)

Ngram = tuple[str, ...]


def ngram_counts(tokenized: str, n: int = 4) -> Counter[Ngram]:
    """Counts of all n-grams of order 1..n of a whitespace-tokenised string."""
    words = tokenized.split()
    counts: Counter[Ngram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


@dataclass(frozen=True)
class CiderResult(Generic[K]):
    """``score``: mean CIDEr-D over images (pycocoevalcap's first return value);
    ``per_image``: each image's score, keyed as the inputs were."""

    score: float
    per_image: dict[K, float]


@dataclass
class _Vec:
    # One caption's tf-idf vectors, one dict per n-gram order, their L2 norms, its length.
    weights: list[dict[Ngram, float]]
    norms: list[float]
    length: int


def _to_vec(counts: Counter[Ngram], df: Mapping[Ngram, int], log_n_images: float, n: int) -> _Vec:
    weights: list[dict[Ngram, float]] = [{} for _ in range(n)]
    sq = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        w = float(tf) * (log_n_images - math.log(max(1.0, float(df.get(gram, 0)))))
        weights[order][gram] = w
        sq[order] += w * w
        if order == 1:  # pycocoevalcap counts bigrams as the "length"
            length += tf
    return _Vec(weights, [math.sqrt(s) for s in sq], length)


def _sim(cand: _Vec, ref: _Vec, n: int, sigma: float) -> float:
    """Sum over orders of the clipped, length-penalised cosine similarity."""
    delta = float(cand.length - ref.length)
    penalty = math.exp(-(delta**2) / (2.0 * sigma**2))
    total = 0.0
    for k in range(n):
        ref_w = ref.weights[k]
        val = 0.0
        for gram, w in cand.weights[k].items():
            r = ref_w.get(gram, 0.0)
            val += min(w, r) * r
        if cand.norms[k] != 0.0 and ref.norms[k] != 0.0:
            val /= cand.norms[k] * ref.norms[k]
        total += val * penalty
    return total


def cider_d(
    references: Mapping[K, Sequence[str]],
    candidates: Mapping[K, str],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> CiderResult[K]:
    """CIDEr-D of one candidate caption per image against that image's references.

    ``references[img]`` is a non-empty list of tokenised reference captions and
    ``candidates[img]`` one tokenised candidate; both mappings must have the same keys. Equals
    ``pycocoevalcap.cider.cider.Cider(n, sigma).compute_score(references, {k: [c]})`` up to
    floating-point rounding. (pycocoevalcap honours its ``n`` only for ``n = 4``: its n-gram
    extraction is fixed at order 4. Here ``n`` sets both.) Unlike pycocoevalcap, a corpus whose
    references are all empty scores 0 instead of crashing.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if set(references) != set(candidates):
        only_refs = sorted(map(repr, set(references) - set(candidates)))[:5]
        only_cands = sorted(map(repr, set(candidates) - set(references)))[:5]
        raise ValueError(
            "references and candidates must have the same image keys; "
            f"only in references: {only_refs}, only in candidates: {only_cands}"
        )
    if len(references) == 0:
        raise ValueError("no images to score: references and candidates are empty")
    keys = list(references)
    ref_counts: dict[K, list[Counter[Ngram]]] = {}
    cand_counts: dict[K, Counter[Ngram]] = {}
    for key in keys:
        refs = references[key]
        cand = candidates[key]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"image {key!r}: references must be a non-empty list of str, got {refs!r}"
            )
        if not isinstance(cand, str):
            raise TypeError(
                f"image {key!r}: the candidate must be one str, got {type(cand).__name__}"
            )
        for r in refs:
            if not isinstance(r, str):
                raise TypeError(f"image {key!r}: reference must be a str, got {r!r}")
        ref_counts[key] = [ngram_counts(r, n) for r in refs]
        cand_counts[key] = ngram_counts(cand, n)

    # Document frequency: in how many images' reference sets each n-gram occurs.
    df: Counter[Ngram] = Counter()
    for counts_list in ref_counts.values():
        df.update(set().union(*(c.keys() for c in counts_list)))
    log_n_images = math.log(float(len(keys)))

    per_image: dict[K, float] = {}
    for key in keys:
        cand_vec = _to_vec(cand_counts[key], df, log_n_images, n)
        total = 0.0
        for rc in ref_counts[key]:
            total += _sim(cand_vec, _to_vec(rc, df, log_n_images, n), n, sigma)
        # mean over orders, mean over references, x10
        per_image[key] = total / n / len(ref_counts[key]) * 10.0
    score = sum(per_image.values()) / len(per_image)
    return CiderResult(score=score, per_image=per_image)
