"""`evaluate`: one model, one task, one cache policy over a dataset -> per-sample results + summary.

Flow (every rank of a torchrun group runs it; a single process is rank 0 of 1):

1. open the data (columns checked), read the results already in ``--out`` (headers checked),
   take the first ``limit`` samples not yet done (or failed), rank r takes every world-th one;
2. per batch: the task's prompt in the family's template, images decoded, ``avl.generate``
   (greedy, the task's ``max_new_tokens``), the text cut at EOS, decoded, post-processed as
   lmms-eval's model wrapper does, scored; each record is appended to the rank's results file at
   once. A sample that fails (image, fields, generation, scoring) is logged and recorded as
   failed, or stops the run with ``strict``;
3. rank 0 gathers the new records (``gather_object``), merges them into ``samples.jsonl`` and
   computes the metrics once over the whole set (corpus metrics such as CIDEr included).

A record's ``kv`` is ``GenerationOutput.stats.total`` (bytes / rows stored and used after the last
step, and those of the uncompressed cache, summed over layers) divided by the batch size: with
``batch_size > 1`` it is the batch's mean, and a batch decodes until its longest answer ends, so
use ``batch_size=1`` for the paper's per-sample Table 3 numbers. A record's ``efficiency`` holds its
time to first token, time per output token and peak memory (:mod:`avl.eval.efficiency`; with
``batch_size > 1`` the batch's), ``seconds`` the generation's wall-clock time divided by the batch size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from avl.cache.policies import FeaturePolicy, Full, Policy, split_policy
from avl.eval.data import Sample, SampleError, open_dataset
from avl.eval.distributed import Dist, shard
from avl.eval.efficiency import record_efficiency, reset_peak_memory
from avl.eval.results import KV_FIELDS, SUMMARY_NAME, Record, ResultsStore, format_summary, merge_record, summarize
from avl.eval.tasks import Task, get_task
from avl.families import Family, Processor, get_family
from avl.generate import Generative, generate
from avl.inputs import check_policy
from avl.loading import DTYPES, load
from avl.weights import read_config, resolve_checkpoint

__all__ = ["DTYPES", "EvalConfig", "LoadedModel", "evaluate", "load_for_eval", "model_identity", "policy_dict"]

log = logging.getLogger("avl.eval")

PTB_BACKENDS = ("python", "java")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run. ``limit``: the first N samples only; ``max_new_tokens``: overrides the
    task's; ``family``: overrides config.json's ``model_type``; ``ptb_tokenizer``: CIDEr's PTB
    tokenisation ("python" approximation or the exact "java" one)."""

    model: str
    task: str
    data: str
    policy: Policy | FeaturePolicy = field(default_factory=Full)  # a feature policy runs beside Full()
    out: str = "avl-eval"
    limit: int | None = None
    batch_size: int = 1
    strict: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False
    max_new_tokens: int | None = None
    family: str | None = None
    ptb_tokenizer: str = "python"
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("limit", self.limit is None or (isinstance(self.limit, int) and self.limit >= 1), "an integer >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 1, "an integer >= 1"),
            ("dtype", self.dtype in DTYPES, ", ".join(DTYPES)),
            ("ptb_tokenizer", self.ptb_tokenizer in PTB_BACKENDS, ", ".join(PTB_BACKENDS)),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")
        get_task(self.task)  # unknown task: a clear error before anything is loaded


@dataclass
class LoadedModel:
    """A model with its processor and family, loaded once and reused across runs (sweeps)."""

    model_id: str
    directory: Path
    model: nn.Module
    processor: Processor
    family: Family
    dtype: str
    device: str


def model_identity(model: str, family: str | None = None) -> tuple[str, Family, Path]:
    """(id for the results header, family, local directory) of a checkpoint, without loading weights."""
    directory = resolve_checkpoint(model)
    fam = get_family(family or str(read_config(directory).get("model_type")))
    model_id = str(Path(model).resolve()) if Path(model).exists() else str(model)
    return model_id, fam, directory


def load_for_eval(model: str, dtype: str = "float32", device: str = "cpu", family: str | None = None) -> LoadedModel:
    """Load a checkpoint (directory or hub id) with the processor of its family."""
    model_id, fam, directory = model_identity(model, family)
    processor = fam.load_processor(directory)
    net = load(directory, dtype=dtype, device=device)
    return LoadedModel(model_id, directory, net, processor, fam, dtype, device)


def policy_dict(policy: Policy | FeaturePolicy) -> dict[str, Any]:
    """The policy as JSON: its class, fields and repr."""
    return {"name": type(policy).__name__, "fields": dataclasses.asdict(policy), "repr": repr(policy)}


def run_config(config: EvalConfig, task: Task, model_id: str, family: Family, dtype: str,
               data_sha256: str) -> dict[str, Any]:
    """What decides each sample's result; stored (hashed) in the results header. The data is keyed
    on its content (`data_sha256`), not only its path: editing it in place makes a new run."""
    return {
        "model": model_id,
        "model_type": family.model_type,
        "task": task.name,
        "data": str(Path(config.data).expanduser().resolve()),
        "data_sha256": data_sha256,
        "policy": policy_dict(config.policy),
        "dtype": dtype,
        "max_new_tokens": config.max_new_tokens or task.max_new_tokens,
        "prompt_model": family.lmms_eval_model,
    }


@dataclass
class _Prepared:
    sample: Sample
    prompt: str
    image: Any
    target: dict[str, Any]


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Worker:
    """Runs batches of samples through the model and turns them into records."""

    def __init__(self, config: EvalConfig, loaded: LoadedModel, task: Task) -> None:
        self.config, self.loaded, self.task = config, loaded, task
        self.max_new_tokens = config.max_new_tokens or task.max_new_tokens
        tokenizer = loaded.processor.tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = loaded.processor.pad_token_id
        self.param_dtype = next(loaded.model.parameters()).dtype
        self.device = torch.device(loaded.device)

    def failure(self, sample: Sample, error: BaseException) -> Record:
        message = str(error) if isinstance(error, SampleError) else \
            f"sample {sample.id} (index {sample.index}): {type(error).__name__}: {error}"
        if self.config.strict:
            raise SampleError(message + " (stopped by --strict)") from error
        log.warning("avl eval: %s", message)
        return {"index": sample.index, "id": sample.id, "error": message}

    def prepare(self, sample: Sample) -> _Prepared:
        family = self.loaded.family
        try:
            target = self.task.target(sample.doc)
            prompt = family.prompt(self.task.text(sample.doc, family.lmms_eval_model))
        except ValueError as error:
            raise SampleError(f"sample {sample.id} (index {sample.index}): {error}") from error
        return _Prepared(sample, prompt, sample.load_image(), target)

    def run(self, batch: Sequence[Sample]) -> list[Record]:
        records: list[Record] = []
        ready: list[_Prepared] = []
        for sample in batch:
            try:
                ready.append(self.prepare(sample))
            except Exception as error:
                records.append(self.failure(sample, error))
        if ready:
            try:
                records.extend(self.generate(ready))
            except SampleError:
                raise  # --strict: it names its sample
            except Exception as error:
                if self.config.strict:
                    ids = ", ".join(p.sample.id for p in ready)
                    raise SampleError(f"generation failed for sample(s) {ids}: {type(error).__name__}: {error} "
                                      "(stopped by --strict)") from error
                if len(ready) == 1:
                    records.append(self.failure(ready[0].sample, error))
                else:  # find the culprit: one at a time
                    for p in ready:
                        try:
                            records.extend(self.generate([p]))
                        except Exception as single:
                            records.append(self.failure(p.sample, single))
        return sorted(records, key=lambda r: r["index"])

    def generate(self, ready: Sequence[_Prepared]) -> list[Record]:
        loaded = self.loaded
        inputs = {k: v.to(loaded.device) for k, v in
                  loaded.processor([p.prompt for p in ready], [p.image for p in ready]).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.param_dtype)  # and e.g. LLaVA-NeXT's image_sizes
        policy, feature_policy = split_policy(self.config.policy)
        reset_peak_memory(self.device)
        start = time.perf_counter()
        out = generate(cast(Generative, loaded.model), **inputs, policy=policy, feature_policy=feature_policy,
                       max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad,
                       compile=self.config.compile)
        seconds = (time.perf_counter() - start) / len(ready)
        efficiency = record_efficiency(out.timings, self.device)
        total = out.stats.total
        kv = {name: getattr(total, name) / len(ready) for name in KV_FIELDS}
        records = []
        for item, row in zip(ready, out.tokens.tolist(), strict=True):
            ids = row[:row.index(self.eos)] if self.eos in row else row
            prediction = loaded.family.postprocess(loaded.processor.decode(ids), self.task.until)
            try:
                scores = self.task.score(prediction, item.target) if self.task.score else None
            except Exception as error:
                records.append(self.failure(item.sample, error))
                continue
            records.append({"index": item.sample.index, "id": item.sample.id, "error": None, "prediction": prediction,
                            "target": item.target, "scores": scores, "new_tokens": len(ids), "kv": kv,
                            "seconds": seconds, "efficiency": efficiency})
        return records


class _Progress:
    """tqdm bar (rank 0) with throughput and the running score."""

    def __init__(self, total: int, task: Task, done: Iterable[Record], enabled: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        self.task = task
        self.bar = tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True)
        self.sum = 0.0
        self.count = 0
        self.tokens = 0
        self.seconds = 0.0
        for record in done:
            self._score(record)

    def _score(self, record: Record) -> None:
        if self.task.running and record.get("error") is None:
            self.sum += record["scores"][self.task.running]
            self.count += 1

    def update(self, record: Record) -> None:
        self._score(record)
        self.tokens += record.get("new_tokens", 0)
        self.seconds += record.get("seconds", 0.0)
        postfix = {}
        if self.count:
            postfix[self.task.running or "score"] = f"{self.sum / self.count:.4f}"
        if self.seconds:
            postfix["tok/s"] = f"{self.tokens / self.seconds:.1f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def evaluate(
    config: EvalConfig,
    loaded: LoadedModel | None = None,
    dist: Dist | None = None,
    on_record: Callable[[Record], None] | None = None,
) -> dict[str, Any] | None:
    """Run (or resume) one evaluation; returns the summary on rank 0, None on other ranks.

    `loaded` reuses a model across runs; `dist` defaults to the torchrun environment;
    `on_record` is called after each record is written (progress hooks, tests). A policy that cannot
    run on the model (Trim on LLaVA, a layer beyond its depth) raises ValueError before any sample.
    """
    started = time.perf_counter()
    task = get_task(config.task)
    own_dist = dist is None
    dist = dist or Dist.from_env()
    try:
        dataset = open_dataset(config.data, task)
        if loaded is None:
            model_id, family, _ = model_identity(config.model, config.family)
            store = ResultsStore(config.out, run_config(config, task, model_id, family, config.dtype, dataset.sha256))
        else:
            store = ResultsStore(config.out, run_config(config, task, loaded.model_id, loaded.family, loaded.dtype,
                                                        dataset.sha256))
        done = store.load()  # a results file of another configuration is refused before the model loads
        loaded = loaded or load_for_eval(config.model, config.dtype, config.device, config.family)
        check_policy(loaded.model, *split_policy(config.policy))  # once, before the first sample: not one failure per sample
        dist.barrier()
        selected = range(min(config.limit or len(dataset), len(dataset)))
        pending = [i for i in selected if i not in done or done[i].get("error") is not None]
        mine = shard(pending, dist.rank, dist.world)
        worker = _Worker(config, loaded, task)
        progress = _Progress(len(mine), task, (done[i] for i in selected if i in done),
                             config.progress and dist.is_main, f"{task.name} {type(config.policy).__name__}")
        new: list[Record] = []
        try:
            with store.writer(dist.rank, dist.world) as writer:
                for batch in _batches(dataset.samples(mine), config.batch_size):
                    for record in worker.run(batch):
                        writer.append(record)
                        new.append(record)
                        progress.update(record)
                        if on_record is not None:
                            on_record(record)
        finally:
            progress.close()
        gathered = dist.gather(new)
        summary = _finish(config, task, store, done, gathered, selected, started) if gathered is not None else None
        dist.barrier()
        return summary
    finally:
        if own_dist:
            dist.close()


def _finish(config: EvalConfig, task: Task, store: ResultsStore, done: dict[int, Record],
            gathered: list[list[Record]], selected: range, started: float) -> dict[str, Any]:
    """Rank 0: merge every rank's new records into ``samples.jsonl``, score the selected samples once."""
    for part in gathered:
        for record in part:
            merge_record(done, record)
    store.consolidate(done)
    missing = [i for i in selected if i not in done]
    if missing:
        raise RuntimeError(f"no result for samples {missing[:10]} after the run")
    options = {"ptb_tokenizer": config.ptb_tokenizer}
    summary = summarize(task, store.config, [done[i] for i in selected], time.perf_counter() - started, options)
    summary["out"] = str(Path(config.out))
    write_json(Path(config.out) / SUMMARY_NAME, summary)
    return summary


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def print_summary(summary: dict[str, Any]) -> None:
    print(format_summary(summary), flush=True)
