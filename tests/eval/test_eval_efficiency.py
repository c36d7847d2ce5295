"""Efficiency in every result: time to first token, time per output token, KV bytes and peak memory
per sample, in the summary (JSON and printed), kept across a resume, and in sweep tables and plots.
The numbers are checked against the `GenerationOutput` that `avl.generate` returned for the sample."""

from __future__ import annotations

import json
import resource
import statistics
from pathlib import Path

import pytest
import torch

from avl.cache.policies import AVL, Full
from avl.eval import EvalConfig, evaluate, load_for_eval, run_sweep, runner
from avl.eval.efficiency import efficiency_summary, peak_memory
from avl.eval.results import format_summary
from avl.eval.sweep import plot_points, sweep_table
from avl.testing.eval_data import write_tiny_jsonl
from avl.testing.llava_checkpoint import build_tiny_llava

FIELDS = ("ttft_s", "time_per_token_s", "kv_stored_bytes", "kv_used_bytes", "peak_memory_bytes")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_for_eval(str(checkpoint))


@pytest.fixture
def outputs(monkeypatch):
    """The `GenerationOutput` of every `generate` call of the runner, in order."""
    seen = []
    real = runner.generate

    def recording(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(runner, "generate", recording)
    return seen


def config(checkpoint, data, out, **kwargs) -> EvalConfig:
    return EvalConfig(model=str(checkpoint), task="vqav2_val", data=str(data), out=str(out), progress=False, **kwargs)


def saved(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()[1:]]


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_records_and_summary_carry_each_generations_efficiency(checkpoint, loaded, outputs, tmp_path, capsys):
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=3)
    before = rss_bytes()
    full = evaluate(config(checkpoint, data, tmp_path / "full", max_new_tokens=4), loaded=loaded)
    after = rss_bytes()
    assert len(outputs) == 3  # batch_size 1: one generation per sample
    records = saved(tmp_path / "full")
    for record, out in zip(records, outputs, strict=True):
        efficiency, steps = record["efficiency"], out.timings.step_s
        assert efficiency["ttft_s"] == out.timings.prefill_s > 0
        assert efficiency["decode_steps"] == len(steps) == out.tokens.shape[1] - 1
        assert efficiency["time_per_token_s"] == pytest.approx(statistics.mean(steps)) and min(steps) > 0
        assert record["kv"]["stored_bytes"] == out.stats.total.stored_bytes > 0
        assert record["kv"]["used_bytes"] == out.stats.total.used_bytes > 0
        assert before <= efficiency["peak_memory_bytes"] <= after  # the process high-water, in bytes
        assert efficiency["peak_memory_source"] == "process_rss_high_water"

    summary = full["efficiency"]
    assert summary["ttft_s"] == pytest.approx(statistics.mean(o.timings.prefill_s for o in outputs))
    assert summary["time_per_token_s"] == pytest.approx(statistics.mean(statistics.mean(o.timings.step_s)
                                                                        for o in outputs))
    assert summary["kv_stored_bytes"] == pytest.approx(statistics.mean(o.stats.total.stored_bytes for o in outputs))
    assert summary["kv_used_bytes"] == pytest.approx(statistics.mean(o.stats.total.used_bytes for o in outputs))
    assert summary["peak_memory_bytes"] == max(r["efficiency"]["peak_memory_bytes"] for r in records)
    assert summary["timed_samples"] == 3
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["efficiency"] == summary

    runner.print_summary(full)
    printed = capsys.readouterr().out
    assert (f"time to first token {1e3 * summary['ttft_s']:.2f} ms, per output token "
            f"{1e3 * summary['time_per_token_s']:.2f} ms (mean of 3 samples); peak memory "
            f"{summary['peak_memory_bytes'] / 2**20:.1f} MB (process_rss_high_water)") in printed

    compressed = evaluate(config(checkpoint, data, tmp_path / "avl", max_new_tokens=4,
                                 policy=AVL(secondary=0.25, core=0.125, refresh_every=2, text_keep=0.5)),
                          loaded=loaded)
    for small, big in zip(saved(tmp_path / "avl"), records, strict=True):
        assert small["kv"]["stored_bytes"] < big["kv"]["stored_bytes"]
        assert small["kv"]["used_bytes"] < big["kv"]["used_bytes"]
    assert compressed["efficiency"]["kv_stored_bytes"] < summary["kv_stored_bytes"]
    assert compressed["efficiency"]["kv_used_bytes"] < summary["kv_used_bytes"]


def test_one_generated_token_has_no_time_per_token(checkpoint, loaded, outputs, tmp_path):
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=2)
    summary = evaluate(config(checkpoint, data, tmp_path / "out", max_new_tokens=1), loaded=loaded)
    assert [o.timings.step_s for o in outputs] == [[], []]
    for record, out in zip(saved(tmp_path / "out"), outputs, strict=True):
        assert record["efficiency"]["time_per_token_s"] is None and record["efficiency"]["decode_steps"] == 0
        assert record["efficiency"]["ttft_s"] == out.timings.prefill_s > 0
    assert summary["efficiency"]["time_per_token_s"] is None and summary["efficiency"]["ttft_s"] > 0
    assert "per output token n/a (mean of 2 samples)" in format_summary(summary)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["efficiency"]["time_per_token_s"] is None


def test_a_resumed_run_keeps_the_first_runs_efficiency(checkpoint, loaded, tmp_path):
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=3)
    out = tmp_path / "out"
    evaluate(config(checkpoint, data, out, max_new_tokens=3, limit=1), loaded=loaded)
    first = saved(out)[0]["efficiency"]
    seen = []
    resumed = evaluate(config(checkpoint, data, out, max_new_tokens=3), loaded=loaded, on_record=seen.append)
    assert [r["index"] for r in seen] == [1, 2]
    records = saved(out)
    assert records[0]["efficiency"] == first  # kept as measured, not measured again
    assert resumed["efficiency"]["timed_samples"] == 3
    assert resumed["efficiency"]["ttft_s"] == pytest.approx(statistics.mean(r["efficiency"]["ttft_s"]
                                                                            for r in records))

    # a results file written before records had an efficiency: those samples are not timed
    lines = (out / "samples.jsonl").read_text().splitlines()
    old = {k: v for k, v in json.loads(lines[1]).items() if k != "efficiency"}
    (out / "samples.jsonl").write_text("\n".join([lines[0], json.dumps(old), *lines[2:]]) + "\n")
    again = evaluate(config(checkpoint, data, out, max_new_tokens=3), loaded=loaded)
    assert again["efficiency"]["timed_samples"] == 2
    assert again["efficiency"]["ttft_s"] == pytest.approx(statistics.mean(r["efficiency"]["ttft_s"]
                                                                          for r in records[1:]))
    assert again["efficiency"]["kv_stored_bytes"] == resumed["efficiency"]["kv_stored_bytes"]


def test_efficiency_summary_of_hand_made_records():
    def record(ttft, per_token, peak, stored):
        return {"efficiency": {"ttft_s": ttft, "time_per_token_s": per_token, "decode_steps": 2,
                               "peak_memory_bytes": peak, "peak_memory_source": "cuda_max_memory_allocated"},
                "kv": {"stored_bytes": stored, "used_bytes": stored / 2}}

    records = [record(0.2, 0.01, 300, 100), record(0.4, None, 700, 300), record(0.3, 0.03, 500, 200)]
    summary = efficiency_summary(records, {"stored_bytes": 200.0, "used_bytes": 100.0})
    assert summary == {"ttft_s": pytest.approx(0.3), "time_per_token_s": pytest.approx(0.02),
                       "kv_stored_bytes": 200.0, "kv_used_bytes": 100.0, "peak_memory_bytes": 700,
                       "peak_memory_source": "cuda_max_memory_allocated", "timed_samples": 3}
    assert efficiency_summary([], None) == dict.fromkeys(FIELDS) | {"peak_memory_source": None, "timed_samples": 0}
    assert peak_memory(torch.device("meta")) == (None, None)  # neither the CUDA allocator nor the process RSS


def test_sweep_table_and_plot_data_carry_the_efficiency(checkpoint, loaded, tmp_path):
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=2)
    base = config(checkpoint, data, tmp_path / "unused", max_new_tokens=3)
    rows = run_sweep(base, [Full(), AVL(secondary=0.25), AVL(secondary=0.5)], tmp_path / "sweep", loaded=loaded,
                     plot=False)
    for row in rows:
        summary = json.loads((Path(row["out"]) / "summary.json").read_text())
        assert min(row["ttft_ms"], row["time_per_token_ms"], row["peak_memory_mb"]) > 0
        assert row["ttft_ms"] == pytest.approx(1e3 * summary["efficiency"]["ttft_s"])
        assert row["time_per_token_ms"] == pytest.approx(1e3 * summary["efficiency"]["time_per_token_s"])
        assert row["peak_memory_mb"] == pytest.approx(summary["efficiency"]["peak_memory_bytes"] / 2**20)
        assert row["stored_mb"] == pytest.approx(summary["efficiency"]["kv_stored_bytes"] / 2**20)
    header = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()[0]
    assert "| ttft_ms | time_per_token_ms | peak_memory_mb |" in header
    assert "ttft_ms,time_per_token_ms,peak_memory_mb" in (tmp_path / "sweep" / "sweep.csv").read_text()

    panels = plot_points(rows)
    assert list(panels) == ["stored_mb", "time_per_token_ms"]
    kv, time = panels["stored_mb"], panels["time_per_token_ms"]
    assert kv["full"] == [(rows[0]["stored_mb"], rows[0]["score"])]
    assert kv["avl"] == sorted([(rows[1]["stored_mb"], rows[1]["score"]), (rows[2]["stored_mb"], rows[2]["score"])])
    assert kv["avl"][0][0] < kv["avl"][1][0] < kv["full"][0][0]
    assert time["avl"] == sorted((r["time_per_token_ms"], r["score"]) for r in rows[1:])


def test_plot_points_leave_out_rows_without_a_value():
    rows = [{"family": "full", "score": 0.5, "stored_mb": 2.0, "time_per_token_ms": None, "metric": "accuracy"},
            {"family": "avl", "score": None, "stored_mb": 1.0, "time_per_token_ms": 3.0, "metric": "accuracy"},
            {"family": "avl", "score": 0.25, "stored_mb": 1.5, "time_per_token_ms": 2.0, "metric": "accuracy"}]
    assert plot_points(rows) == {"stored_mb": {"full": [(2.0, 0.5)], "avl": [(1.5, 0.25)]},
                                 "time_per_token_ms": {"avl": [(2.0, 0.25)]}}
    markdown, _ = sweep_table([rows[0] | {"policy": "full"}])
    header, _, row = (line.split(" | ") for line in markdown.splitlines())
    cells = dict(zip(header, row, strict=True))
    assert (cells["stored_mb"], cells["time_per_token_ms"]) == ("2.0000", "n/a")  # no per-token time: n/a, not 0
