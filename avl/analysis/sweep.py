"""The analysis averaged over the samples of an eval task (the paper averages 100 Flickr30k samples).

Samples come from `avl.eval`'s readers (a directory of the hub dataset's parquet shards, a .parquet
or a .jsonl file) and get the task's lmms-eval prompt in the model family's chat template, as in
`avl eval`; each one is analysed on its own (`analyze`) and the reports are averaged.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from avl.analysis.analyze import analyze
from avl.analysis.report import AttentionReport
from avl.eval.data import Dataset, SampleError
from avl.eval.runner import LoadedModel
from avl.eval.tasks import Task


def analyze_task(loaded: LoadedModel, task: Task, dataset: Dataset, limit: int, max_new_tokens: int = 16,
                 top: float = 0.3, mass: float = 0.8, progress: bool = True) -> tuple[AttentionReport, list[dict[str, Any]]]:
    """The mean report over the first `limit` samples of `dataset` (all of them if fewer), and per
    sample its index, id, N_img and generated tokens. A sample that cannot be read or prompted
    raises `SampleError` naming it."""
    count = min(limit, len(dataset))
    family, processor = loaded.family, loaded.processor
    dtype = next(loaded.model.parameters()).dtype
    reports, samples = [], []
    bar = tqdm(dataset.samples(range(count)), total=count, desc="avl analyze", unit="sample", disable=not progress,
               dynamic_ncols=True)
    for sample in bar:
        try:
            prompt = family.prompt(task.text(sample.doc, family.lmms_eval_model))
        except ValueError as error:
            raise SampleError(f"sample {sample.id} (index {sample.index}): {error}") from error
        inputs = {k: v.to(loaded.device) for k, v in processor([prompt], [sample.load_image()]).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        report = analyze(loaded.model, **inputs, max_new_tokens=max_new_tokens, top=top, mass=mass)
        reports.append(report)
        samples.append({"index": sample.index, "id": sample.id, "n_image": report.n_image, "tokens": report.tokens})
    return AttentionReport.mean(reports), samples
