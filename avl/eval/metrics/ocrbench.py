"""OCRBench scoring: substring match per question, counts per category, final score out of 1000.

Sources of the rules:

* Official OCRBench evaluation (Yuliang-Liu/MultimodalOCR, the OCRBench ``eval`` scripts): for
  each ground-truth answer,

  - if the sample's source dataset is ``"HME100k"`` (handwritten math expressions): answer and
    prediction are stripped, ``"\\n"`` -> ``" "``, then all spaces removed; *no* lower-casing;
  - otherwise: answer and prediction are lower-cased, stripped, ``"\\n"`` -> ``" "``;

  and the question scores 1 if some processed answer is a substring of the processed
  prediction. The score is counted per ``question_type`` (the 10 categories below); the
  final score is the plain count of correct questions (OCRBench has 1000 questions, so it is
  "out of 1000").

* lmms-eval 0.2.x ``lmms_eval/tasks/ocrbench/utils.py``: the same rules, applied to the HF
  dataset ``echo840/OCRBench`` (columns ``dataset``, ``question_type``, ``answer``), except
  that ``ocrbench_process_results`` lower-cases and strips the prediction *before* choosing
  the rule, so for HME100k the prediction is lower-cased while the answer is not (LaTeX with
  capitals, e.g. ``\\Delta``, can then never match). ``ocrbench_aggregate_accuracy`` groups the
  categories into five groups (the first six are summed as "Text Recognition") and returns
  ``final_score / 1000``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "HME_DATASET",
    "OCRBENCH_CATEGORIES",
    "OCRBENCH_GROUPS",
    "OCRBenchResult",
    "ocrbench_match",
    "ocrbench_score",
]

# Values of the ``question_type`` column of echo840/OCRBench, with the number of questions of
# each in the full benchmark (from the per-category totals printed by lmms-eval's aggregator).
OCRBENCH_CATEGORIES: dict[str, int] = {
    "Regular Text Recognition": 50,
    "Irregular Text Recognition": 50,
    "Artistic Text Recognition": 50,
    "Handwriting Recognition": 50,
    "Digit String Recognition": 50,
    "Non-Semantic Text Recognition": 50,
    "Scene Text-centric VQA": 200,
    "Doc-oriented VQA": 200,
    "Key Information Extraction": 200,
    "Handwritten Mathematical Expression Recognition": 100,
}

# lmms-eval's grouping of the categories in its report (totals 300/200/200/200/100).
OCRBENCH_GROUPS: dict[str, tuple[str, ...]] = {
    "Text Recognition": (
        "Regular Text Recognition",
        "Irregular Text Recognition",
        "Artistic Text Recognition",
        "Handwriting Recognition",
        "Digit String Recognition",
        "Non-Semantic Text Recognition",
    ),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    "Handwritten Mathematical Expression Recognition": (
        "Handwritten Mathematical Expression Recognition",
    ),
}

# Value of the ``dataset`` column that selects the math-expression rule.
HME_DATASET = "HME100k"

OCRBenchVariant = Literal["official", "lmms_eval"]


def _hme_form(text: str) -> str:
    return text.strip().replace("\n", " ").replace(" ", "")


def _text_form(text: str) -> str:
    return text.lower().strip().replace("\n", " ")


def ocrbench_match(
    prediction: str,
    answers: str | Sequence[str],
    dataset: str,
    *,
    variant: OCRBenchVariant = "official",
) -> int:
    """1 if one of ``answers`` (after the rule for ``dataset``) occurs in the prediction, else 0.

    ``answers`` may be one string or a list (the ``answer`` column holds lists). ``dataset`` is
    the sample's source dataset (``dataset`` column); only ``"HME100k"`` changes the rule.
    ``variant="lmms_eval"`` lower-cases and strips the prediction first, as lmms-eval does.
    An empty answer is a substring of every prediction and so always matches, as in the
    reference scripts.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if variant == "lmms_eval":
        prediction = prediction.lower().strip()
    elif variant != "official":
        raise ValueError(f"variant must be 'official' or 'lmms_eval', got {variant!r}")
    answer_list = [answers] if isinstance(answers, str) else list(answers)
    if len(answer_list) == 0:
        raise ValueError("answers is empty: a question needs at least one answer")
    for a in answer_list:
        if not isinstance(a, str):
            raise TypeError(f"answer must be a str, got {type(a).__name__}: {a!r}")
    form = _hme_form if dataset == HME_DATASET else _text_form
    pred = form(prediction)
    return int(any(form(a) in pred for a in answer_list))


@dataclass(frozen=True)
class OCRBenchResult:
    """Outcome of :func:`ocrbench_score`.

    ``per_category``: correct count per ``question_type`` (all 10 categories present);
    ``per_group``: lmms-eval's five groups; ``final_score``: total correct (out of 1000 on the
    full benchmark); ``num_questions``: how many were scored; ``accuracy``: ``final_score /
    num_questions``. lmms-eval reports ``final_score / 1000`` instead, which equals
    ``accuracy`` only on the full 1000-question set.
    """

    per_category: dict[str, int]
    per_group: dict[str, int]
    final_score: int
    num_questions: int

    @property
    def accuracy(self) -> float:
        return self.final_score / self.num_questions


def ocrbench_score(
    predictions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    datasets: Sequence[str],
    question_types: Sequence[str],
    *,
    variant: OCRBenchVariant = "official",
) -> OCRBenchResult:
    """Score a set of OCRBench questions (parallel sequences, one entry per question).

    ``answers``, ``datasets`` and ``question_types`` are the ``answer``, ``dataset`` and
    ``question_type`` columns of echo840/OCRBench. An unknown ``question_type`` is an error.
    """
    n = len(predictions)
    lengths = {
        "answers": len(answers),
        "datasets": len(datasets),
        "question_types": len(question_types),
    }
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ValueError(f"{n} predictions but {bad}: all sequences must have the same length")
    if n == 0:
        raise ValueError("no questions to score")
    per_category = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    for i, (pred, ans, ds, qt) in enumerate(zip(predictions, answers, datasets, question_types)):
        if qt not in per_category:
            raise ValueError(
                f"question {i}: unknown question_type {qt!r}; expected one of "
                f"{sorted(OCRBENCH_CATEGORIES)}"
            )
        per_category[qt] += ocrbench_match(pred, ans, ds, variant=variant)
    per_group = {g: sum(per_category[c] for c in cats) for g, cats in OCRBENCH_GROUPS.items()}
    return OCRBenchResult(
        per_category=per_category,
        per_group=per_group,
        final_score=sum(per_category.values()),
        num_questions=n,
    )
