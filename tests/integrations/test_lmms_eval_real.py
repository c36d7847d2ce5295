"""The real lmms-eval (0.7.3) end to end: ``model="avl"`` found through the entry point, two policies by
``model_args``, the local tasks of ``lmms_tasks/`` over a tiny local parquet, offline. Runs only where
lmms-eval is installed (README, "lmms-eval"); test_lmms_eval_adapter.py covers the adapter without it,
on the requests recorded here.

Checks: lmms-eval still makes exactly the recorded requests; its DocVQA predictions and ANLS equal
``avl eval``'s on the same samples for each policy; its other answers (two images, multiple choice)
equal the adapter's on the recorded requests; its multiple-choice accuracy is the argmin rule's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from integrations.lmms_helpers import HERE, N_DOCS, RECORDED, TASKS_DIR, request, task_dict, unwrap

from avl.eval import EvalConfig, evaluate
from avl.testing.eval_data import write_tiny_parquet
from avl.integrations.lmms_eval import AvlLmms, parse_model_args
from avl.testing.llava_checkpoint import build_tiny_llava

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (README: lmms-eval)")

TASKS = ("avl_tiny_docvqa", "avl_tiny_two_images", "avl_tiny_mc")
POLICY_ARGS = ("", ",policy=avl,secondary=0.45,core=0.30,refresh_every=3,prefill_keep=0.9,text_keep=0.5")


def _key(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True)


def test_lmms_eval_end_to_end_with_two_policies(tmp_path):
    checkpoint = build_tiny_llava(tmp_path / "ckpt")
    data = write_tiny_parquet("docvqa_val", tmp_path / "data", n=N_DOCS)  # data/DocVQA/validation-*.parquet
    shutil.copytree(TASKS_DIR, tmp_path / "tasks")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    model_args = [f"pretrained={checkpoint}{extra}" for extra in POLICY_ARGS]
    done = subprocess.run([sys.executable, str(HERE / "lmms_eval_run.py"), "tasks", ",".join(TASKS), "runs.json",
                           *model_args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = json.loads((tmp_path / "runs.json").read_text())

    assert sorted(map(_key, runs[0]["requests"])) == sorted(map(_key, RECORDED))  # the recorded test's input
    losses = []
    for run, args in zip(runs, model_args, strict=True):
        assert sorted(map(_key, run["requests"])) == sorted(map(_key, RECORDED))
        parsed = dict(item.split("=", 1) for item in args.split(","))
        policy = parse_model_args(parsed)[1]
        out = tmp_path / f"avl-eval-{len(losses)}"
        evaluate(EvalConfig(model=str(checkpoint), task="docvqa_val", data=str(data), policy=policy, out=str(out),
                            max_new_tokens=3, progress=False))
        records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()[1:]]
        by_index = {r["index"]: r for r in records}
        docvqa = sorted(run["samples"]["avl_tiny_docvqa"], key=lambda s: s["doc_id"])
        assert [s["resps"] for s in docvqa] == [[by_index[i]["prediction"]] for i in range(N_DOCS)]
        assert run["metrics"]["avl_tiny_docvqa"]["anls,none"] == \
            pytest.approx(sum(r["scores"]["anls"] for r in records) / N_DOCS)

        model = AvlLmms(**parsed)
        model.task_dict = task_dict()
        two = [e for e in RECORDED if e["task"] == "avl_tiny_two_images"]
        answers = dict(zip((e["doc_id"] for e in two), model.generate_until([request(e) for e in two]), strict=True))
        assert {s["doc_id"]: s["resps"] for s in run["samples"]["avl_tiny_two_images"]} == \
            {i: [a] for i, a in answers.items()}
        mc = [e for e in RECORDED if e["task"] == "avl_tiny_mc"]
        pairs = [unwrap(r) for r in model.loglikelihood([request(e) for e in mc])]
        expected = {}
        for entry, pair in zip(mc, pairs, strict=True):
            expected.setdefault(entry["doc_id"], []).append(list(pair))
        logged = {s["doc_id"]: s["resps"] for s in run["samples"]["avl_tiny_mc"]}
        assert logged.keys() == expected.keys()
        for doc_id, choices in expected.items():
            assert [[pytest.approx(loss, abs=1e-9), greedy] for loss, greedy in choices] == logged[doc_id]
        argmin_acc = sum(min(range(2), key=lambda c: logged[d][c][0]) == 0 for d in logged) / len(logged)
        assert run["metrics"]["avl_tiny_mc"]["acc,none"] == pytest.approx(argmin_acc)  # gold: choice 0, "yes"
        losses.append([c[0] for d in sorted(logged) for c in logged[d]])
    assert losses[0] != losses[1]  # the policy reached the model
