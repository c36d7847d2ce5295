"""End to end on the tiny random LLaVA: every task from its hub layout, the jsonl format, resume,
failures, sweeps and the command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import sys

import pytest
import torch

from avl.cache.policies import AVL, Full
from avl.eval import EvalConfig, RunMismatchError, SampleError, evaluate, load_for_eval, run_sweep
from avl.eval.cli import add_eval_parser, main
from avl.testing.eval_data import tiny_rows, write_tiny_jsonl, write_tiny_parquet
from avl.testing.llava_checkpoint import build_tiny_llava

TIMING = ("wall_time_s", "generation_s", "out", "efficiency")  # measured, so not the same twice


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_for_eval(str(checkpoint))


def config(checkpoint, task, data, out, **kwargs) -> EvalConfig:
    kwargs.setdefault("max_new_tokens", 3)
    return EvalConfig(model=str(checkpoint), task=task, data=str(data), out=str(out), progress=False, **kwargs)


def without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING}


def records(out) -> list[dict]:
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["avl_eval_run"] == 1
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "efficiency")} for line in lines[1:]]


@pytest.mark.parametrize("task,metric", [("docvqa_val", "nls_hit_rate"), ("textvqa_val", "accuracy"),
                                         ("ocrbench", "accuracy"), ("nocaps_val", "cider"),
                                         ("flickr30k_test", "cider"), ("vqav2_val", "accuracy")])
def test_every_task_runs_from_its_hub_layout(task, metric, checkpoint, loaded, tmp_path):
    data = write_tiny_parquet(task, tmp_path / "data", n=3)
    summary = evaluate(config(checkpoint, task, data, tmp_path / "out", policy=AVL(secondary=0.5, text_keep=0.5)),
                       loaded=loaded)
    assert summary["metric"] == metric and 0.0 <= summary["score"] <= (10.0 if metric == "cider" else 1.0)
    assert (summary["samples"], summary["failed"]) == (3, 0)
    assert 40 < summary["kv_cache"]["stored_pct"] < 70 and summary["kv_cache"]["full_mb"] > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["score"] == summary["score"]
    saved = records(tmp_path / "out")
    assert [r["index"] for r in saved] == [0, 1, 2]
    assert all(isinstance(r["prediction"], str) and 1 <= r["new_tokens"] <= 3 for r in saved)


def test_jsonl_format_from_the_command_line(checkpoint, tmp_path, capsys):
    data = write_tiny_jsonl("vqav2_val", tmp_path / "custom", n=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(checkpoint), "--task", "vqav2_val", "--data", str(data), "--out", str(tmp_path / "out"),
              "--max-new-tokens", "2", "--batch-size", "2", "--policy", "fastv", "--fastv-keep", "0.25",
              "--no-progress"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "vqav2_val  |  FastV(layer=2, keep=0.25)" in out and "samples 3, failed 0" in out
    assert [r["id"] for r in records(tmp_path / "out")] == ["custom-0", "custom-1", "custom-2"]


def test_resume_after_limit_or_interruption_gives_the_same_summary(checkpoint, loaded, tmp_path):
    data = write_tiny_parquet("ocrbench", tmp_path / "data", n=5)
    policy = AVL(secondary=0.5, core=0.25, refresh_every=2, text_keep=0.5)
    whole = evaluate(config(checkpoint, "ocrbench", data, tmp_path / "whole", policy=policy), loaded=loaded)

    evaluate(config(checkpoint, "ocrbench", data, tmp_path / "limited", policy=policy, limit=2), loaded=loaded)
    seen = []
    resumed = evaluate(config(checkpoint, "ocrbench", data, tmp_path / "limited", policy=policy), loaded=loaded,
                       on_record=seen.append)
    assert [r["index"] for r in seen] == [2, 3, 4]  # only the samples not done yet
    assert without_timing(resumed) == without_timing(whole)

    count = []

    def crash_after_two(record):
        count.append(record)
        if len(count) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(config(checkpoint, "ocrbench", data, tmp_path / "killed", policy=policy), loaded=loaded,
                 on_record=crash_after_two)
    assert len(records(tmp_path / "killed")) == 2
    # as if a torchrun rank had written them: its file is read and merged into samples.jsonl
    (tmp_path / "killed" / "samples.jsonl").rename(tmp_path / "killed" / "samples.rank1.jsonl")
    seen.clear()
    resumed = evaluate(config(checkpoint, "ocrbench", data, tmp_path / "killed", policy=policy), loaded=loaded,
                       on_record=seen.append)
    assert [r["index"] for r in seen] == [2, 3, 4]
    assert without_timing(resumed) == without_timing(whole)
    assert records(tmp_path / "killed") == records(tmp_path / "whole")
    assert not list((tmp_path / "killed").glob("samples.rank*"))


def test_a_results_folder_of_another_configuration_is_refused(checkpoint, loaded, tmp_path):
    data = write_tiny_parquet("textvqa_val", tmp_path / "data", n=3)
    evaluate(config(checkpoint, "textvqa_val", data, tmp_path / "out", limit=1), loaded=loaded)
    with pytest.raises(RunMismatchError, match="different run .*differing: policy:.*Full.*AVL"):
        evaluate(config(checkpoint, "textvqa_val", data, tmp_path / "out", policy=AVL(secondary=0.5)), loaded=loaded)
    with pytest.raises(RunMismatchError, match="differing: max_new_tokens: 3 there, 2 now"):
        evaluate(config(checkpoint, "textvqa_val", data, tmp_path / "out", max_new_tokens=2), loaded=loaded)


def test_a_failing_sample_is_logged_and_counted_or_stops_the_run_with_strict(checkpoint, loaded, tmp_path, caplog):
    rows = tiny_rows("docvqa_val", 4)
    rows[2]["image"] = {"bytes": b"\x89PNG broken", "path": "2.png"}
    data = write_tiny_parquet("docvqa_val", tmp_path / "data", rows=rows)
    with caplog.at_level(logging.WARNING, logger="avl.eval"):
        summary = evaluate(config(checkpoint, "docvqa_val", data, tmp_path / "lenient", batch_size=2), loaded=loaded)
    assert (summary["samples"], summary["failed"]) == (4, 1)
    assert "sample 50002 (index 2): unreadable image" in caplog.text
    failed = [r for r in records(tmp_path / "lenient") if r["error"]]
    assert [r["id"] for r in failed] == ["50002"]
    with pytest.raises(SampleError, match=r"sample 50002 \(index 2\): unreadable image .*stopped by --strict"):
        evaluate(config(checkpoint, "docvqa_val", data, tmp_path / "strict", strict=True), loaded=loaded)
    assert len(records(tmp_path / "strict")) == 2  # the samples before it are kept for a resume


def test_a_generation_failure_is_isolated_to_its_sample(checkpoint, loaded, tmp_path, monkeypatch):
    import avl.eval.runner as runner

    calls = []

    def flaky(model, input_ids, **kwargs):
        calls.append(input_ids.shape[0])
        if input_ids.shape[0] > 1 or len(calls) == 2:  # every batch, and the first single retry
            raise RuntimeError("boom")
        return runner_generate(model, input_ids, **kwargs)

    runner_generate = runner.generate
    monkeypatch.setattr(runner, "generate", flaky)
    data = write_tiny_parquet("docvqa_val", tmp_path / "data", n=3)
    summary = evaluate(config(checkpoint, "docvqa_val", data, tmp_path / "lenient", batch_size=2), loaded=loaded)
    assert calls == [2, 1, 1, 1] and (summary["samples"], summary["failed"]) == (3, 1)
    assert [r["error"] for r in records(tmp_path / "lenient")][0] == "sample 50000 (index 0): RuntimeError: boom"
    with pytest.raises(SampleError, match=r"generation failed for sample\(s\) 50000, 50001: RuntimeError: boom"):
        evaluate(config(checkpoint, "docvqa_val", data, tmp_path / "strict", batch_size=2, strict=True),
                 loaded=loaded)


def test_sweep_writes_a_table_and_a_plot(checkpoint, loaded, tmp_path, capsys, monkeypatch):
    data = write_tiny_parquet("nocaps_val", tmp_path / "data", n=3)
    base = config(checkpoint, "nocaps_val", data, tmp_path / "unused", max_new_tokens=2)
    policies = [Full(), AVL(secondary=0.25), AVL(secondary=0.5)]
    rows = run_sweep(base, policies, tmp_path / "sweep", loaded=loaded)
    assert [r["policy"] for r in rows] == ["full", "avl secondary=0.25", "avl secondary=0.5"]
    assert rows[0]["stored_pct"] == pytest.approx(100.0) and rows[1]["stored_pct"] < rows[2]["stored_pct"] < 100
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("\n") == 5
    assert (tmp_path / "sweep" / "sweep.csv").read_text().startswith("policy,family,metric,score,stored_pct")
    assert (tmp_path / "sweep" / "runs" / "avl-secondary0.25" / "samples.jsonl").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # the optional plot extra
        assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
        (tmp_path / "sweep" / "sweep.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    run_sweep(base, policies[:1], tmp_path / "sweep", loaded=loaded)  # resumes: nothing left to generate
    assert "no plot: matplotlib is not installed (pip install 'avl[plot]')" in capsys.readouterr().out
    assert not (tmp_path / "sweep" / "sweep.png").exists()


def test_command_line_errors_are_clear(checkpoint, tmp_path, capsys):
    data = write_tiny_parquet("ocrbench", tmp_path / "data", n=2)
    common = ["--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "out")]
    for argv, message in [
        (["--task", "vqa"] + common, "unknown task 'vqa'; known tasks: docvqa_val, textvqa_val, ocrbench"),
        (["--task", "ocrbench", "--model", str(checkpoint), "--data", str(tmp_path / "none")], "no such file"),
        (["--task", "ocrbench", "--sweep", "--policy", "avl", "--secondary", "0.5"] + common, "--sweep takes its"),
        (["--task", "ocrbench", "--grid", "secondary=0.5"] + common, "--grid / --baselines need --sweep"),
        (["--task", "ocrbench", "--sweep", "--grid", "h2o: window=3"] + common, "h2o has no field 'window'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_eval_subcommand_plugs_into_a_parent_parser(checkpoint, tmp_path):
    parser = argparse.ArgumentParser(prog="avl")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", str(checkpoint), "--task", "flickr30k_test", "--data", "d",
                              "--sweep", "--grid", "secondary=0.3,0.5", "--baselines"])
    assert (args.command, args.task, args.sweep, args.grid, args.baselines) == ("eval", "flickr30k_test", True,
                                                                                 ["secondary=0.3,0.5"], True)


def test_a_llava_next_checkpoint_runs_with_its_anyres_processor(tmp_path):
    """The family comes from config.json: LLaVA-NeXT's processor, and its image_sizes reach the model."""
    from tiny_llava import build_tiny_next_checkpoint

    directory = build_tiny_next_checkpoint(tmp_path / "next")
    data = write_tiny_parquet("textvqa_val", tmp_path / "data", n=2)
    summary = evaluate(config(directory, "textvqa_val", data, tmp_path / "out", batch_size=2,
                              policy=AVL(secondary=0.5)))
    assert (summary["samples"], summary["failed"]) == (2, 0)
    assert 40 < summary["kv_cache"]["stored_pct"] < 90


def test_a_llava_onevision_checkpoint_runs_with_its_processor_and_prompt(tmp_path):
    """LLaVA-OneVision: its anyres_max processor (image_sizes, batch_num_images reach the model), lmms-eval's
    qwen_1_5 prompt, every A-VL part."""
    from tiny_llava import build_tiny_onevision_checkpoint

    directory = build_tiny_onevision_checkpoint(tmp_path / "onevision")
    data = write_tiny_parquet("textvqa_val", tmp_path / "data", n=2)
    summary = evaluate(config(directory, "textvqa_val", data, tmp_path / "out", batch_size=2, dtype="float64",
                              policy=AVL(secondary=0.45, core=0.3, refresh_every=3, prefill_keep=0.9, text_keep=0.5)))
    assert (summary["samples"], summary["failed"]) == (2, 0)
    assert summary["kv_cache"]["stored_pct"] < 90


def test_a_qwen_vl_checkpoint_runs_with_its_processor_and_prompt(tmp_path):
    from tiny_llava import build_tiny_qwen_checkpoint

    directory = build_tiny_qwen_checkpoint(tmp_path / "qwen")
    data = write_tiny_parquet("vqav2_val", tmp_path / "data", n=2)
    summary = evaluate(config(directory, "vqav2_val", data, tmp_path / "out", batch_size=2, dtype="float64",
                              policy=AVL(secondary=0.5, text_keep=0.5)))
    assert (summary["samples"], summary["failed"]) == (2, 0)
    assert summary["kv_cache"]["stored_pct"] < 90


def test_a_llama_vision_checkpoint_runs_with_trim(tmp_path):
    """Llama-3.2-Vision: its processor's aspect ratios and cross-attention mask reach the model."""
    from avl.cache.trim import Trim
    from tiny_llava import build_tiny_mllama_checkpoint

    directory = build_tiny_mllama_checkpoint(tmp_path / "mllama")
    data = write_tiny_parquet("nocaps_val", tmp_path / "data", n=2)
    summary = evaluate(config(directory, "nocaps_val", data, tmp_path / "out", batch_size=2, policy=Trim(keep=0.5)))
    assert (summary["samples"], summary["failed"]) == (2, 0)
    assert summary["kv_cache"]["stored_pct"] < 100


def test_editing_the_data_in_place_is_refused_naming_it(checkpoint, loaded, tmp_path):
    """Resume keys the run on the data's content, not its path (issue 11, item 4)."""
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=3)
    evaluate(config(checkpoint, "vqav2_val", data, tmp_path / "out", limit=2), loaded=loaded)
    lines = data.read_text().splitlines()
    edited = json.loads(lines[2]) | {"question": "What is written here?"}
    data.write_text("\n".join([*lines[:2], json.dumps(edited)]) + "\n")
    with pytest.raises(RunMismatchError, match=rf"the data {data} changed since those results were written .*"
                                               r"differing: data_sha256"):
        evaluate(config(checkpoint, "vqav2_val", data, tmp_path / "out"), loaded=loaded)
    assert len(records(tmp_path / "out")) == 2  # nothing mixed in


def test_editing_a_parquet_shard_in_place_is_refused(checkpoint, loaded, tmp_path):
    data = write_tiny_parquet("textvqa_val", tmp_path / "data", n=3)
    evaluate(config(checkpoint, "textvqa_val", data, tmp_path / "out", limit=1), loaded=loaded)
    rows = tiny_rows("textvqa_val", 3)
    rows[0]["question"] = "Another question?"
    write_tiny_parquet("textvqa_val", tmp_path / "data", rows=rows)
    with pytest.raises(RunMismatchError, match="changed since those results were written"):
        evaluate(config(checkpoint, "textvqa_val", data, tmp_path / "out"), loaded=loaded)


@pytest.mark.parametrize("policy_args,match", [
    (["--policy", "trim"], "this model has none"),
    (["--policy", "avl", "--prefill-keep", "0.5", "--prefill-layer", "9"], r"prefill_layer=9 is out of range"),
])
def test_a_policy_that_cannot_run_on_the_model_stops_before_the_first_sample(checkpoint, tmp_path, capsys,
                                                                             policy_args, match):
    """Not every sample recorded as failed with exit 0 (issue 11, item 3)."""
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(checkpoint), "--task", "vqav2_val", "--data", str(data), "--out", str(tmp_path / "out"),
              "--no-progress", *policy_args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avl eval: error: ") and re.search(match, lines[0])
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_a_sweep_checks_every_policy_before_the_first_run(checkpoint, loaded, tmp_path):
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=2)
    policies = [Full(), AVL(prefill_keep=0.5, prefill_layer=9)]
    with pytest.raises(ValueError, match="prefill_layer=9 is out of range"):
        run_sweep(config(checkpoint, "vqav2_val", data, tmp_path / "sweep"), policies, tmp_path / "sweep",
                  loaded=loaded, plot=False)
    assert not (tmp_path / "sweep").exists()


def test_eval_debug_shows_the_traceback(checkpoint, tmp_path):
    data = write_tiny_jsonl("vqav2_val", tmp_path / "data", n=2)
    with pytest.raises(ValueError, match="this model has none"):
        main(["--model", str(checkpoint), "--task", "vqav2_val", "--data", str(data), "--out", str(tmp_path / "out"),
              "--no-progress", "--policy", "trim", "--debug"])
