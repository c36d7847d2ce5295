"""Shared by the lmms-eval adapter tests: the recorded requests, the local tasks' docs and visuals, and the
independent references (lmms-eval's multi-image LLaVA prompt written out, transformers' LLaVA forward).

``lmms_eval_requests.json`` holds the requests lmms-eval 0.7.3 made for the tasks in ``lmms_tasks/`` over
``write_tiny_parquet("docvqa_val", n=4)`` (recorded by ``lmms_eval_run.py --record``); the docs are
rebuilt here from the same rows. Requests are lmms-eval's ``Instance`` when lmms-eval is installed, else
``RecordedRequest``, a stand-in with the one attribute the adapter reads (``args``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from avl.testing.eval_data import tiny_rows
from avl.processing import LLAVA15_SYSTEM_PROMPT

HERE = Path(__file__).resolve().parent
TASKS_DIR = HERE / "lmms_tasks"
RECORDED: list[dict[str, Any]] = json.loads((HERE / "lmms_eval_requests.json").read_text())["requests"]
N_DOCS = 4  # rows of write_tiny_parquet("docvqa_val", n=N_DOCS), seed 0
SPLIT = "validation"


def one_image(doc: dict[str, Any]) -> list[Image.Image]:
    """lmms-eval's ``docvqa_doc_to_visual``."""
    return [doc["image"].convert("RGB")]


def two_images(doc: dict[str, Any]) -> list[Image.Image]:
    """``lmms_tasks/utils.py``'s ``two_images``: the image and its mirror image."""
    image = doc["image"].convert("RGB")
    return [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]


VISUALS: dict[str, Callable[[dict[str, Any]], list[Image.Image]]] = {
    "avl_tiny_docvqa": one_image, "avl_tiny_two_images": two_images, "avl_tiny_mc": one_image}


def docs() -> list[dict[str, Any]]:
    """The tasks' docs as lmms-eval's datasets hands them over (the image decoded to PIL)."""
    out = []
    for row in tiny_rows("docvqa_val", N_DOCS):
        out.append({**row, "image": Image.open(io.BytesIO(row["image"]["bytes"]))})
    return out


def task_dict() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """What lmms-eval's evaluator puts into ``model.task_dict``: task -> split -> docs."""
    rows = docs()
    return {task: {SPLIT: rows} for task in VISUALS}


@dataclass
class RecordedRequest:
    """Stand-in for ``lmms_eval.api.instance.Instance`` (used when lmms-eval is not installed)."""

    args: tuple[Any, ...]


def request(entry: dict[str, Any], doc_to_visual: Callable[[Any], Any] | None = None) -> Any:
    """A recorded request as lmms-eval hands it to a model."""
    second = entry["generation_kwargs"] if entry["type"] == "generate_until" else entry["continuation"]
    args = (entry["context"], second, doc_to_visual or VISUALS[entry["task"]], entry["doc_id"], entry["task"],
            entry["split"])
    try:
        from lmms_eval.api.instance import Instance
    except ImportError:
        return RecordedRequest(args)
    return Instance(request_type=entry["type"], arguments=args, idx=0,
                    metadata={"task": entry["task"], "doc_id": entry["doc_id"], "repeats": 1})


def recorded(kind: str, task: str) -> list[dict[str, Any]]:
    return [e for e in RECORDED if e["type"] == kind and e["task"] == task]


def unwrap(result: Any) -> Any:
    """A loglikelihood answer without lmms-eval's ``GenerationResult`` wrapper (see ``_through_evaluator``)."""
    return getattr(result, "text", result)


def llava_prompt(context: str, n_images: int = 1) -> str:
    """lmms-eval's llava wrapper, written out: ``" ".join(["<image>"] * n) + "\\n" + context`` as the user
    turn of ``conv_vicuna_v1`` (system prompt, ``USER: ``, ``ASSISTANT:``)."""
    return f"{LLAVA15_SYSTEM_PROMPT} USER: {' '.join(['<image>'] * n_images)}\n{context} ASSISTANT:"


def transformers_continuation_loss(hf_model: Any, processor: Any, prompt: str, continuation: str,
                                   images: Sequence[Image.Image]) -> tuple[float, bool]:
    """The reference: one transformers forward over prompt + continuation; the mean negative log-probability
    of the continuation's tokens (each predicted from the position before it) and whether each is the argmax."""
    import torch

    whole = processor([prompt + continuation], [list(images)])
    n_prompt = processor([prompt], [list(images)])["input_ids"].shape[1]
    with torch.no_grad():
        logits = hf_model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"],
                          pixel_values=whole["pixel_values"]).logits[0].double()
    targets = whole["input_ids"][0, n_prompt:]
    logprobs = torch.log_softmax(logits[n_prompt - 1:-1], dim=-1)
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(-picked.mean()), bool((logprobs.argmax(-1) == targets).all())
