"""Data-parallel evaluation: `torchrun --nproc_per_node 2 -m avl.eval` (2 CPU processes, gloo) gives
the per-sample results and the summary of a single process, CIDEr computed once on the whole set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avl.eval.cli import main
from avl.testing.eval_data import write_tiny_parquet
from avl.testing.llava_checkpoint import build_tiny_llava

REPO = Path(__file__).resolve().parents[2]
TIMING = ("wall_time_s", "generation_s", "out", "efficiency")  # measured, so not the same twice


def run(command: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def outputs(out: Path) -> tuple[list[dict], dict]:
    lines = (out / "samples.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "efficiency")}
               for line in lines[1:]]
    summary = json.loads((out / "summary.json").read_text())
    return records, {k: v for k, v in summary.items() if k not in TIMING}


def test_torchrun_two_processes_match_one(tmp_path):
    checkpoint = build_tiny_llava(tmp_path / "tiny")
    data = write_tiny_parquet("nocaps_val", tmp_path / "data", n=5)  # 5 samples: shards of 3 and 2
    args = ["-m", "avl.eval", "--model", str(checkpoint), "--task", "nocaps_val", "--data", str(data),
            "--dtype", "float64", "--max-new-tokens", "4", "--no-progress",
            "--policy", "avl", "--secondary", "0.5", "--core", "0.25", "--refresh-every", "2", "--text-keep", "0.5"]
    parallel = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    *args, "--out", str(tmp_path / "parallel")])
    assert parallel.stdout.count("samples 5, failed 0") == 1  # printed by rank 0 only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([*args[2:], "--out", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 0
    single_records, single_summary = outputs(tmp_path / "single")
    parallel_records, parallel_summary = outputs(tmp_path / "parallel")
    assert [r["index"] for r in parallel_records] == [0, 1, 2, 3, 4]
    assert parallel_records == single_records
    assert parallel_summary == single_summary
    parallel_eff, single_eff = (json.loads((tmp_path / name / "summary.json").read_text())["efficiency"]
                                for name in ("parallel", "single"))
    assert parallel_eff["timed_samples"] == single_eff["timed_samples"] == 5  # every rank's records carry theirs
    assert parallel_eff["kv_stored_bytes"] == single_eff["kv_stored_bytes"] and parallel_eff["ttft_s"] > 0
    assert not list((tmp_path / "parallel").glob("samples.rank*.jsonl"))  # merged into samples.jsonl
