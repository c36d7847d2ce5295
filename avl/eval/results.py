"""Per-sample results on disk (resumable) and the run summary.

``--out DIR`` holds

* ``samples.jsonl``: a header line ``{"avl_eval_run": 1, "config_hash": ..., "config": {...}}``
  (model, task, data path and content hash, policy, dtype, generation settings: everything that
  changes a sample's result), then one JSON record per sample, appended (and flushed) as soon as it is done;
* ``samples.rank<r>.jsonl`` while a data-parallel run is under way (one writer per file); rank 0
  merges them into ``samples.jsonl`` at the end;
* ``summary.json``: the metrics, the KV cache (``kv_cache``, the paper's Table 3 numbers) and the
  ``efficiency`` block (time to first token, time per output token, KV bytes, peak memory:
  :mod:`avl.eval.efficiency`), over every selected sample, those of earlier (resumed) runs included.

A new run reads every results file in DIR, refuses one whose header belongs to a different
configuration (:class:`RunMismatchError`, naming the fields that differ), and skips the samples
already done. A line cut short by an interruption is dropped. Samples recorded as failed are
tried again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from avl.eval.efficiency import efficiency_summary
from avl.eval.tasks import Task

__all__ = ["RESULTS_NAME", "SUMMARY_NAME", "ResultsStore", "RunMismatchError", "config_hash", "format_summary",
           "summarize"]

RESULTS_NAME = "samples.jsonl"
SUMMARY_NAME = "summary.json"
HEADER_KEY = "avl_eval_run"
FORMAT_VERSION = 1
KV_FIELDS = ("stored_bytes", "used_bytes", "full_bytes", "stored_rows", "used_rows", "full_rows")
MB = 2**20
COUNT_PREFIXES = ("group/", "final_score")  # metrics that are counts, printed as integers

Record = dict[str, Any]


class RunMismatchError(ValueError):
    """A results file in the output folder belongs to a different run configuration."""


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _complete_lines(path: Path) -> list[str]:
    """The file's newline-terminated lines (a trailing partial line, cut by a crash, is dropped)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return lines[:-1]  # the last element is "" (complete file) or a partial line


class ResultsStore:
    """The results files of one run configuration in one output folder."""

    def __init__(self, out: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
        self.out = Path(out)
        self.config = dict(config)
        self.hash = config_hash(self.config)

    @property
    def header(self) -> Record:
        return {HEADER_KEY: FORMAT_VERSION, "config_hash": self.hash, "config": self.config}

    def files(self) -> list[Path]:
        main = self.out / RESULTS_NAME
        parts = sorted(self.out.glob("samples.rank*.jsonl"))
        return ([main] if main.exists() else []) + parts

    def _check_header(self, path: Path, line: str) -> None:
        try:
            header = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunMismatchError(f"{path}: the first line is not an avl eval header ({error})") from error
        if not isinstance(header, dict) or HEADER_KEY not in header:
            raise RunMismatchError(f"{path} is not an avl eval results file (no {HEADER_KEY!r} header)")
        if header.get("config_hash") != self.hash:
            theirs = header.get("config", {})
            keys = [key for key in sorted(set(theirs) | set(self.config)) if theirs.get(key) != self.config.get(key)]
            differ = [f"{key}: {theirs.get(key)!r} there, {self.config.get(key)!r} now" for key in keys]
            changed = ""
            if "data_sha256" in keys and theirs.get("data") == self.config.get("data"):
                changed = (f"the data {self.config.get('data')} changed since those results were written (its "
                           "content hash differs), so old and new records would mix; ")
            raise RunMismatchError(
                f"{path} holds results of a different run (config {header.get('config_hash')}, this run "
                f"{self.hash}): {changed}differing: {'; '.join(differ) or 'format'}. Use another --out, or delete "
                "the file to start over.")

    def load(self) -> dict[int, Record]:
        """Every record already in the folder, by sample index (checks all headers first)."""
        records: dict[int, Record] = {}
        for path in self.files():
            lines = _complete_lines(path)
            if not lines:
                continue
            self._check_header(path, lines[0])
            for number, line in enumerate(lines[1:], start=2):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number}: corrupt record ({error})") from error
                merge_record(records, record)
        return records

    def writer(self, rank: int, world: int) -> RecordWriter:
        name = RESULTS_NAME if world == 1 else f"samples.rank{rank}.jsonl"
        return RecordWriter(self.out / name, self.header)

    def consolidate(self, records: Mapping[int, Record]) -> Path:
        """Write all `records` (index order) to ``samples.jsonl`` atomically; drop the rank files."""
        path = self.out / RESULTS_NAME
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(self.header) + "\n")
            for index in sorted(records):
                f.write(json.dumps(records[index]) + "\n")
        os.replace(tmp, path)
        for part in self.out.glob("samples.rank*.jsonl"):
            part.unlink()
        return path


def merge_record(records: dict[int, Record], record: Record) -> None:
    """Add `record`: a success replaces anything; a failure never replaces a success."""
    old = records.get(record["index"])
    if old is None or record.get("error") is None or old.get("error") is not None:
        records[record["index"]] = record


class RecordWriter:
    """Appends records to one results file, one flushed line each (a context manager)."""

    def __init__(self, path: Path, header: Record) -> None:
        self.path = path
        self.header = header
        self.file: TextIO | None = None

    def __enter__(self) -> RecordWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # drop a line cut short by an interruption
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self.file = self.path.open("a", encoding="utf-8")
        if self.file.tell() == 0:
            self.append(self.header)
        return self

    def append(self, record: Record) -> None:
        assert self.file is not None, "use RecordWriter as a context manager"
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def kv_means(records: Iterable[Mapping[str, Any]]) -> dict[str, float] | None:
    """The mean over `records` of each of their ``kv`` fields; None when none has one."""
    kv = [r["kv"] for r in records if r.get("kv")]
    return {name: _mean([k[name] for k in kv]) for name in KV_FIELDS} if kv else None


def kv_summary(means: Mapping[str, float] | None) -> dict[str, float]:
    """The paper's Table 3 numbers from :func:`kv_means`: mean over samples of the cache bytes stored /
    used after the last step (MB) and as a share of the uncompressed cache (mean stored / mean full, in %)."""
    mean = means or dict.fromkeys(KV_FIELDS, 0.0)
    full = mean["full_bytes"] or 1.0
    return {
        "stored_pct": 100 * mean["stored_bytes"] / full, "used_pct": 100 * mean["used_bytes"] / full,
        "stored_mb": mean["stored_bytes"] / MB, "used_mb": mean["used_bytes"] / MB, "full_mb": mean["full_bytes"] / MB,
        "stored_rows": mean["stored_rows"], "used_rows": mean["used_rows"], "full_rows": mean["full_rows"],
    }


def summarize(task: Task, config: Mapping[str, Any], records: Sequence[Record], wall_time_s: float,
              options: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary over `records` (one per sample, failures included)."""
    ok = [r for r in records if r.get("error") is None]
    metrics = task.aggregate(ok, options)
    kv = kv_means(ok)
    return {
        "task": task.name,
        "model": config.get("model"),
        "policy": config.get("policy", {}).get("repr"),
        "config_hash": config_hash(config),
        "metric": task.primary,
        "score": metrics.get(task.primary),
        "metrics": metrics,
        "samples": len(records),
        "failed": len(records) - len(ok),
        "kv_cache": kv_summary(kv),
        "efficiency": efficiency_summary(ok, kv),
        "new_tokens_mean": _mean([r["new_tokens"] for r in ok]),
        "generation_s": sum(r.get("seconds", 0.0) for r in records),
        "wall_time_s": wall_time_s,
        "config": dict(config),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few human-readable lines."""
    kv = summary["kv_cache"]
    lines = [f"{summary['task']}  |  {summary['policy']}  |  {summary['model']}"]
    width = max([len(name) for name in summary["metrics"]] + [len(summary["metric"])])
    for name, value in summary["metrics"].items():
        shown = f"{value:g}" if name.startswith(COUNT_PREFIXES) else f"{value:.4f}"
        mark = "   <- primary" if name == summary["metric"] else ""
        lines.append(f"  {name:<{width}}  {shown}{mark}")
    if summary["score"] is None:
        lines.append(f"  {summary['metric']:<{width}}  n/a (no sample scored)")
    lines.append(f"  samples {summary['samples']}, failed {summary['failed']}")
    lines.append(f"  KV cache per sample after the last step: stored {kv['stored_pct']:.1f}% "
                 f"({kv['stored_mb']:.2f} MB), "
                 f"used {kv['used_pct']:.1f}% ({kv['used_mb']:.2f} MB) of {kv['full_mb']:.2f} MB full")
    lines.append(_efficiency_line(summary["efficiency"]))
    rate = summary["samples"] / summary["generation_s"] if summary["generation_s"] else 0.0
    lines.append(f"  wall time {summary['wall_time_s']:.1f} s this run; generation {summary['generation_s']:.1f} s "
                 f"over all samples ({rate:.2f} samples/s per process)")
    return "\n".join(lines)


def _efficiency_line(efficiency: Mapping[str, Any]) -> str:
    def ms(seconds: float | None) -> str:
        return "n/a" if seconds is None else f"{1e3 * seconds:.2f} ms"

    peak = efficiency["peak_memory_bytes"]
    memory = "n/a" if peak is None else f"{peak / MB:.1f} MB ({efficiency['peak_memory_source']})"
    return (f"  time to first token {ms(efficiency['ttft_s'])}, per output token {ms(efficiency['time_per_token_s'])} "
            f"(mean of {efficiency['timed_samples']} samples); peak memory {memory}")
