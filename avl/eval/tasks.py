"""The A-VL paper's six evaluation tasks, as lmms-eval runs them.

Source of every prompt, generation setting and metric below: EvolvingLMMs-Lab/lmms-eval at tag
``v0.2.0`` (the 0.2.x line the paper's Tables 2 and 3 were produced with; the task files are
unchanged in what we use through v0.3.x except where noted), files
``lmms_eval/tasks/<task>/*.yaml`` and ``lmms_eval/tasks/<task>/utils.py``:

=============== =================== ========= ========== ============== ===============================
task            hub dataset         config    split      max_new_tokens  metric (lmms-eval name)
=============== =================== ========= ========== ============== ===============================
docvqa_val      lmms-lab/DocVQA     DocVQA    validation 32              ``anls`` (= our nls_hit_rate)
textvqa_val     lmms-lab/textvqa    -         validation 32 (*)          ``exact_match`` (TextVQA acc.)
ocrbench        echo840/OCRBench    -         test       128             ``ocrbench_accuracy``
nocaps_val      lmms-lab/NoCaps     -         validation 64              ``nocaps_CIDEr``
flickr30k_test  lmms-lab/flickr30k  -         test       64              ``flickr_CIDEr``
vqav2_val       lmms-lab/VQAv2      -         validation 16              ``exact_match`` (VQA acc.)
=============== =================== ========= ========== ============== ===============================

All greedy (``temperature: 0`` / ``do_sample: False``, or no sampling keys, which lmms-eval's
model wrappers turn into greedy). (*) ``_default_template_textvqa_yaml`` sets no
``max_new_tokens``, so lmms-eval's ``llava`` wrapper falls back to 1024; we cap at 32, the DocVQA
value, for the same single-word-or-phrase answers (override with ``--max-new-tokens``).

Prompts (``doc_to_text`` plus ``model_specific_prompt_kwargs``, chosen by the lmms-eval model
name, ``"default"`` otherwise; see :mod:`avl.families` for the chat template around them):

* docvqa: ``f"{pre_prompt}{question}{post_prompt}"``; default post_prompt
  ``"\\nAnswer the question using a single word or phrase."``, qwen_vl ``" Answer:"``.
* textvqa: ``f"{pre_prompt}{question.capitalize()}{ocr_ref}{post_prompt}"`` (``str.capitalize``
  also lower-cases the rest of the question); ``ocr_ref`` is
  ``"\\nReference OCR token: " + ", ".join(ocr_tokens)`` when the kwargs set ``ocr`` (false in
  both entries); post prompts as docvqa. ``until: ["ASSISTANT:"]``.
* vqav2: ``f"{pre_prompt}{question}{post_prompt}"``, default post prompt as docvqa (no qwen_vl entry).
* ocrbench: ``question.strip()``, no kwargs.
* nocaps: the kwargs' ``prompt``, ``"Provide a one-sentence caption for the provided image."``.
* flickr30k: the same sentence, hard-coded in ``flickr_doc_to_text``.

Answer post-processing and scoring (all in :mod:`avl.eval.metrics`, whose docstrings give the
exact rules): DocVQA ``nls_hit`` (what lmms-eval 0.2.x reports as "anls": the generated text is
stripped, a question scores 1 if any answer has NLS >= 0.5) and the official ANLS; TextVQA
``textvqa_accuracy`` (EvalAI processor on prediction and answers); VQAv2 ``vqav2_accuracy`` in
the lmms-eval variant (EvalAI processor on the prediction, ``vqav2_process_results``) and the
official one; OCRBench ``ocrbench_match`` in the lmms-eval variant (prediction lower-cased and
stripped first), reported as correct / questions (lmms-eval divides by 1000, the same on the full
set); NoCaps / Flickr30k CIDEr-D after PTB tokenisation (pycocoevalcap's ``Cider`` on
``PTBTokenizer`` output in ``*_aggregation_result``), over the whole evaluated set.

The primary metric of each task is lmms-eval's number, so that a run reproduces the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from avl.eval.metrics import (
    OCRBENCH_CATEGORIES,
    anls_question,
    cider_d,
    nls_hit,
    ocrbench_match,
    ocrbench_score,
    textvqa_accuracy,
    tokenize_captions,
    vqav2_accuracy,
)

__all__ = ["ANSWER_SHORT", "CAPTION_PROMPT", "TASKS", "Task", "TaskError", "get_task"]

ANSWER_SHORT = "\nAnswer the question using a single word or phrase."
QWEN_ANSWER = " Answer:"
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

Doc = Mapping[str, Any]
PromptKwargs = Mapping[str, Any]
Target = dict[str, Any]


class TaskError(ValueError):
    """A task name or a task's data field is wrong."""


@dataclass(frozen=True)
class Task:
    """One evaluation task: where its data comes from, how a prompt is built, how it is scored.

    ``target(doc)`` extracts what scoring needs from a dataset row (JSON-serialisable, stored with
    each per-sample result so that a results file can be re-scored on its own);
    ``score(prediction, target)`` gives the per-sample scores (None for corpus-level metrics);
    ``aggregate(records, options)`` the task's metrics over the records that have a prediction;
    ``running``: the per-sample score whose mean the progress bar shows (None: corpus metric).
    """

    name: str
    dataset: str
    config: str | None
    split: str
    id_column: str | None
    columns: tuple[str, ...]
    max_new_tokens: int
    doc_to_text: Callable[[Doc, PromptKwargs | None], str]
    target: Callable[[Doc], Target]
    aggregate: Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], dict[str, float]]
    primary: str
    score: Callable[[str, Target], dict[str, float]] | None = None
    prompt_kwargs: Mapping[str, PromptKwargs] = field(default_factory=dict)
    until: tuple[str, ...] = ()
    running: str | None = None
    image_column: str = "image"

    def kwargs_for(self, lmms_eval_model: str) -> PromptKwargs | None:
        """lmms-eval's choice: the model's own entry if the task has one, else ``"default"``."""
        if not self.prompt_kwargs:
            return None
        return self.prompt_kwargs.get(lmms_eval_model, self.prompt_kwargs.get("default"))

    def text(self, doc: Doc, lmms_eval_model: str) -> str:
        """The task text for one row (before the model's chat template)."""
        return self.doc_to_text(doc, self.kwargs_for(lmms_eval_model))


# ----------------------------------------------------------------------------------------------
# Fields
# ----------------------------------------------------------------------------------------------


def _field(doc: Doc, name: str) -> Any:
    if name not in doc or doc[name] is None:
        raise TaskError(f"the row has no {name!r} value")
    return doc[name]


def _strings(doc: Doc, name: str) -> list[str]:
    """A non-empty list of strings; VQAv2's ``{answer, ...}`` structs give their ``answer``."""
    value = _field(doc, name)
    if isinstance(value, str):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, Mapping):
            item = item.get("answer")
        if not isinstance(item, str):
            raise TaskError(f"{name!r} must hold strings, got {item!r}")
        out.append(item)
    if not out:
        raise TaskError(f"{name!r} is empty: scoring needs at least one reference")
    return out


def _question(doc: Doc) -> str:
    question = _field(doc, "question")
    if not isinstance(question, str):
        raise TaskError(f"'question' must be a string, got {question!r}")
    return question


# ----------------------------------------------------------------------------------------------
# Prompts (lmms-eval v0.2.0 doc_to_text functions)
# ----------------------------------------------------------------------------------------------


def _pre_post(kwargs: PromptKwargs | None) -> tuple[str, str]:
    kwargs = kwargs or {}
    return kwargs.get("pre_prompt", ""), kwargs.get("post_prompt", "")


def docvqa_text(doc: Doc, kwargs: PromptKwargs | None) -> str:
    """``docvqa_doc_to_text``."""
    pre, post = _pre_post(kwargs)
    return f"{pre}{_question(doc)}{post}"


def textvqa_text(doc: Doc, kwargs: PromptKwargs | None) -> str:
    """``textvqa_doc_to_text`` (question capitalised; OCR tokens only when asked)."""
    pre, post = _pre_post(kwargs)
    ocr = ""
    if kwargs and kwargs.get("ocr"):
        ocr = f"\nReference OCR token: {', '.join(doc.get('ocr_tokens') or [])}"
    return f"{pre}{_question(doc).capitalize()}{ocr}{post}"


def vqav2_text(doc: Doc, kwargs: PromptKwargs | None) -> str:
    """``vqav2_doc_to_text``."""
    pre, post = _pre_post(kwargs)
    return f"{pre}{_question(doc)}{post}"


def ocrbench_text(doc: Doc, kwargs: PromptKwargs | None) -> str:
    """``ocrbench_doc_to_text``: the question, stripped."""
    return _question(doc).strip()


def caption_text(doc: Doc, kwargs: PromptKwargs | None) -> str:
    """``nocaps_doc_to_text`` (the kwargs' prompt) / ``flickr_doc_to_text`` (hard-coded)."""
    return (kwargs or {}).get("prompt", CAPTION_PROMPT)


# ----------------------------------------------------------------------------------------------
# Targets, per-sample scores, aggregation
# ----------------------------------------------------------------------------------------------


def _answers_target(doc: Doc) -> Target:
    return {"answers": _strings(doc, "answers")}


def _ocrbench_target(doc: Doc) -> Target:
    question_type = _field(doc, "question_type")
    if question_type not in OCRBENCH_CATEGORIES:
        raise TaskError(f"unknown OCRBench question_type {question_type!r}; "
                        f"expected one of {sorted(OCRBENCH_CATEGORIES)}")
    return {"answers": _strings(doc, "answer"), "dataset": str(_field(doc, "dataset")), "question_type": question_type}


def _caption_target(column: str) -> Callable[[Doc], Target]:
    def target(doc: Doc) -> Target:
        return {"references": _strings(doc, column)}

    return target


def _docvqa_score(prediction: str, target: Target) -> dict[str, float]:
    return {"nls_hit": nls_hit(prediction, target["answers"]), "anls": anls_question(prediction, target["answers"])}


def _textvqa_score(prediction: str, target: Target) -> dict[str, float]:
    return {"accuracy": textvqa_accuracy(prediction, target["answers"])}


def _vqav2_score(prediction: str, target: Target) -> dict[str, float]:
    return {"accuracy": vqav2_accuracy(prediction, target["answers"], variant="lmms_eval"),
            "accuracy_official": vqav2_accuracy(prediction, target["answers"], variant="official")}


def _ocrbench_score(prediction: str, target: Target) -> dict[str, float]:
    return {"correct": float(ocrbench_match(prediction, target["answers"], target["dataset"], variant="lmms_eval")),
            "correct_official": float(ocrbench_match(prediction, target["answers"], target["dataset"]))}


def _mean_of(*names: tuple[str, str]) -> Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], dict[str, float]]:
    """Aggregate: metric name <- mean of a per-sample score."""

    def aggregate(records: Sequence[Mapping[str, Any]], options: Mapping[str, Any]) -> dict[str, float]:
        if not records:
            return {}
        return {metric: sum(r["scores"][score] for r in records) / len(records) for metric, score in names}

    return aggregate


def _ocrbench_aggregate(records: Sequence[Mapping[str, Any]], options: Mapping[str, Any]) -> dict[str, float]:
    if not records:
        return {}
    targets = [r["target"] for r in records]
    result = ocrbench_score([r["prediction"] for r in records], [t["answers"] for t in targets],
                            [t["dataset"] for t in targets], [t["question_type"] for t in targets], variant="lmms_eval")
    official = ocrbench_score([r["prediction"] for r in records], [t["answers"] for t in targets],
                              [t["dataset"] for t in targets], [t["question_type"] for t in targets])
    metrics = {"accuracy": result.accuracy, "final_score": float(result.final_score),
               "accuracy_official": official.accuracy}
    metrics.update({f"group/{name}": float(count) for name, count in result.per_group.items()})
    return metrics


def _cider_aggregate(records: Sequence[Mapping[str, Any]], options: Mapping[str, Any]) -> dict[str, float]:
    """CIDEr-D over the whole set: PTB-tokenised references and predictions, keyed by sample."""
    if not records:
        return {}
    backend = options.get("ptb_tokenizer", "python")
    references = tokenize_captions({r["index"]: r["target"]["references"] for r in records}, backend=backend)
    candidates = tokenize_captions({r["index"]: [r["prediction"]] for r in records}, backend=backend)
    return {"cider": cider_d(references, {k: v[0] for k, v in candidates.items()}).score}


_QA_KWARGS = {"default": {"pre_prompt": "", "post_prompt": ANSWER_SHORT},
              "qwen_vl": {"pre_prompt": "", "post_prompt": QWEN_ANSWER}}

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("docvqa_val", "lmms-lab/DocVQA", "DocVQA", "validation", "questionId", ("question", "answers"), 32,
             docvqa_text, _answers_target, _mean_of(("nls_hit_rate", "nls_hit"), ("anls", "anls")), "nls_hit_rate",
             score=_docvqa_score, prompt_kwargs=_QA_KWARGS, running="nls_hit"),
        Task("textvqa_val", "lmms-lab/textvqa", None, "validation", "question_id", ("question", "answers"), 32,
             textvqa_text, _answers_target, _mean_of(("accuracy", "accuracy")), "accuracy", score=_textvqa_score,
             prompt_kwargs={"default": {**_QA_KWARGS["default"], "ocr": False},
                            "qwen_vl": {**_QA_KWARGS["qwen_vl"]}},
             until=("ASSISTANT:",), running="accuracy"),
        Task("ocrbench", "echo840/OCRBench", None, "test", None,
             ("question", "answer", "dataset", "question_type"), 128,
             ocrbench_text, _ocrbench_target, _ocrbench_aggregate, "accuracy", score=_ocrbench_score,
             running="correct"),
        Task("nocaps_val", "lmms-lab/NoCaps", None, "validation", "image_id", ("annotations_captions",), 64,
             caption_text, _caption_target("annotations_captions"), _cider_aggregate, "cider",
             prompt_kwargs={"default": {"prompt": CAPTION_PROMPT}}),
        Task("flickr30k_test", "lmms-lab/flickr30k", None, "test", "img_id", ("caption",), 64,
             caption_text, _caption_target("caption"), _cider_aggregate, "cider"),
        Task("vqav2_val", "lmms-lab/VQAv2", None, "validation", "question_id", ("question", "answers"), 16,
             vqav2_text, _answers_target,
             _mean_of(("accuracy", "accuracy"), ("accuracy_official", "accuracy_official")),
             "accuracy", score=_vqav2_score, prompt_kwargs={"default": _QA_KWARGS["default"]}, running="accuracy"),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name raises :class:`TaskError` listing the known ones."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
