"""ANLS (Average Normalized Levenshtein Similarity) for DocVQA, and lmms-eval's hit-rate variant.

Sources of the rules:

* ANLS: Biten et al., "Scene Text Visual Question Answering" (ICCV 2019), and the official
  DocVQA / InfographicsVQA scoring script of the Robust Reading Competition (the one vendored as
  ``eval_mm/infographicsvqa_eval.py`` in QwenLM/Qwen-VL and copied verbatim into lmms-eval's
  ``lmms_eval/api/metrics.py::anls``, unchanged from v0.1.0 to v0.3.x). Per question and per
  ground truth:

  - both strings are stripped, lower-cased and their whitespace runs collapsed to one space
    (``" ".join(s.strip().lower().split())``), and the edit distance is taken between these;
  - the distance is divided by ``max(len(gt.upper()), len(pred.upper()))`` of the *raw* strings
    (not the normalised ones: a quirk of the script that we keep, so that padded answers score
    as they do there); a zero length gives distance 0;
  - the question's score is ``1 - min(normalised distances)`` (the max similarity over ground
    truths), set to 0 when below the threshold ``tau = 0.5``. ANLS is the mean over questions.

* ``nls_hit``: the number lmms-eval 0.2.x reports as ``anls`` for ``docvqa_val``. That task
  sets no ``process_results`` (``lmms_eval/tasks/docvqa/docvqa_val.yaml``), its target
  (``answers``) is a list, so ``ConfigurableTask.process_results`` in ``lmms_eval/api/task.py``
  takes the ``multiple_target`` branch ("in the case where we have multiple targets, return
  true if any are true"): it calls ``anls`` once per ground truth, then scores the question
  ``1.0 if any(scores) else 0.0``. A question therefore scores 1 as soon as one ground truth
  reaches NLS >= 0.5; partial similarities are rounded up. Before that, ``process_results``
  strips the generated text (``results[0] = results[0].strip()``). The same code is in every
  tag from v0.2.0 through v0.5. This is not ANLS, hence the separate name.
"""

from __future__ import annotations

from collections.abc import Sequence

from avl.eval.metrics.checks import check_ground_truths, check_str

__all__ = [
    "anls",
    "anls_question",
    "levenshtein_distance",
    "nls_hit",
    "nls_hit_rate",
    "normalized_levenshtein_similarity",
]

ANLS_THRESHOLD = 0.5


def levenshtein_distance(a: str, b: str) -> int:
    """Edit distance (unit-cost insertions, deletions, substitutions) between two strings.

    Two-row dynamic programme over code points, O(len(a) * len(b)) time, O(min) memory.
    """
    if len(a) < len(b):
        a, b = b, a
    # b is the shorter string; prev[j] = distance between a[:i] and b[:j]
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cost = 0 if ca == cb else 1
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost))
        prev = cur
    return prev[-1]


def _normalize(text: str) -> str:
    # DocVQA script: strip, lower-case, collapse whitespace runs.
    return " ".join(text.strip().lower().split())


def normalized_levenshtein_similarity(prediction: str, ground_truth: str) -> float:
    """NLS of one prediction against one ground truth, as in the official DocVQA script.

    ``1 - lev(norm(gt), norm(pred)) / max(len(gt.upper()), len(pred.upper()))`` where ``norm``
    strips, lower-cases and collapses whitespace, and the lengths are those of the raw strings.
    Two empty strings have similarity 1. The value can only be negative in contrived Unicode
    cases where lower-casing lengthens a string (e.g. ``"İ"``); thresholding maps those to 0.
    """
    check_str(prediction, "prediction")
    check_str(ground_truth, "ground truth")
    length = max(len(ground_truth.upper()), len(prediction.upper()))
    if length == 0:
        return 1.0
    dist = levenshtein_distance(_normalize(ground_truth), _normalize(prediction))
    return 1.0 - float(dist) / float(length)


def anls_question(
    prediction: str, ground_truths: Sequence[str], threshold: float = ANLS_THRESHOLD
) -> float:
    """ANLS score of one question: max NLS over ground truths, 0 if it is below ``threshold``.

    Raises ``ValueError`` when ``ground_truths`` is empty (the official script would crash on
    ``min([])``; lmms-eval would silently score 0).
    """
    gts = check_ground_truths(ground_truths)
    _check_threshold(threshold)
    best = max(normalized_levenshtein_similarity(prediction, gt) for gt in gts)
    return 0.0 if best < threshold else best


def anls(
    predictions: Sequence[str],
    ground_truths: Sequence[Sequence[str]],
    threshold: float = ANLS_THRESHOLD,
) -> float:
    """ANLS over a set of questions: the mean of :func:`anls_question`."""
    _check_pairs(predictions, ground_truths)
    scores = [anls_question(p, g, threshold) for p, g in zip(predictions, ground_truths)]
    return sum(scores) / len(scores)


def nls_hit(
    prediction: str, ground_truths: Sequence[str], threshold: float = ANLS_THRESHOLD
) -> float:
    """lmms-eval 0.2.x's per-question DocVQA score: 1.0 if any ground truth has NLS >= threshold.

    Reproduces ``ConfigurableTask.process_results`` (multiple-target branch) around
    ``metrics.anls`` in lmms-eval 0.2.x: the prediction is stripped first, each ground truth is
    scored alone with the thresholded ANLS rule, and the question gets 1.0 if any of those scores
    is non-zero (truthy), else 0.0.
    """
    gts = check_ground_truths(ground_truths)
    _check_threshold(threshold)
    check_str(prediction, "prediction")
    pred = prediction.strip()
    scores = [anls_question(pred, [gt], threshold) for gt in gts]
    return 1.0 if any(scores) else 0.0


def nls_hit_rate(
    predictions: Sequence[str],
    ground_truths: Sequence[Sequence[str]],
    threshold: float = ANLS_THRESHOLD,
) -> float:
    """Mean of :func:`nls_hit`: the number lmms-eval 0.2.x reports as DocVQA "anls".

    A question's hit is 1 exactly when its ANLS score on the stripped prediction is non-zero,
    so the rate is >= :func:`anls` whenever predictions carry no surrounding whitespace (with
    whitespace, the raw-length denominator of the official NLS can make ANLS the larger).
    """
    _check_pairs(predictions, ground_truths)
    scores = [nls_hit(p, g, threshold) for p, g in zip(predictions, ground_truths)]
    return sum(scores) / len(scores)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")


def _check_pairs(predictions: Sequence[str], ground_truths: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str):
        raise TypeError("predictions must be a sequence of str, got a single str")
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"{len(predictions)} predictions but {len(ground_truths)} ground-truth lists"
        )
    if len(predictions) == 0:
        raise ValueError("no questions to score: predictions and ground_truths are empty")
