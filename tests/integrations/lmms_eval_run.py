"""Run the real lmms-eval on the local tasks in ``lmms_tasks/`` with the model ``avl``, once per model_args.

    cd RUN_DIR && python lmms_eval_run.py TASKS_DIR TASK,TASK OUT.json MODEL_ARGS [MODEL_ARGS ...] [--record FILE]

``RUN_DIR`` holds the data the task YAMLs name (``data/DocVQA/validation-*.parquet``). Writes a JSON
list to OUT.json: per model_args, lmms-eval's metrics, its logged samples (prediction / responses per doc) and the
requests it handed the model (``AvlLmms.generate_until`` / ``loglikelihood`` are wrapped to record
them). ``--record FILE`` writes the first run's requests there: that is how
``lmms_eval_requests.json`` (the recorded-request test's input) was made. ``test_lmms_eval_real.py``
runs this in a subprocess, since lmms-eval seeds the global RNGs and reconfigures logging.
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any


def _recording(requests: list[dict[str, Any]]) -> None:
    from avl.integrations.lmms_eval import AvlLmms

    generate_until, loglikelihood = AvlLmms.generate_until, AvlLmms.loglikelihood

    def record(kind: str, batch: Any) -> None:
        for request in batch:
            context, second, _, doc_id, task, split = request.args
            key = "generation_kwargs" if kind == "generate_until" else "continuation"
            requests.append({"type": kind, "task": task, "split": split, "doc_id": doc_id, "context": context,
                             key: second})

    def recorded_generate_until(self: Any, batch: Any) -> Any:
        record("generate_until", batch)
        return generate_until(self, batch)

    def recorded_loglikelihood(self: Any, batch: Any) -> Any:
        record("loglikelihood", batch)
        return loglikelihood(self, batch)

    AvlLmms.generate_until = recorded_generate_until  # type: ignore[method-assign]
    AvlLmms.loglikelihood = recorded_loglikelihood  # type: ignore[method-assign]


def run(tasks_dir: str, tasks: list[str], model_args: str, log: list[dict[str, Any]]) -> dict[str, Any]:
    """One lmms-eval run; `log` is the list `_recording` appends the requests to."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    start = len(log)
    out = simple_evaluate(model="avl", model_args=model_args, tasks=tasks, batch_size=1, log_samples=True,
                          task_manager=TaskManager(include_path=tasks_dir, include_defaults=False, model_name="avl"), verbosity="WARNING")
    samples = {task: [{"doc_id": s["doc_id"], "resps": s["filtered_resps"]} for s in rows]
               for task, rows in out["samples"].items()}
    metrics = {task: {k: v for k, v in values.items() if k != "alias" and "stderr" not in k}
               for task, values in out["results"].items()}
    return {"model_args": model_args, "metrics": metrics, "samples": samples, "requests": log[start:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks_dir")
    parser.add_argument("tasks")
    parser.add_argument("out", help="JSON file for the results")
    parser.add_argument("model_args", nargs="+")
    parser.add_argument("--record", help="write the first run's requests to this JSON file")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    log: list[dict[str, Any]] = []
    _recording(log)
    runs = [run(args.tasks_dir, args.tasks.split(","), m, log) for m in args.model_args]
    if args.record:
        Path(args.record).write_text(json.dumps({"lmms_eval": version("lmms_eval"), "requests": runs[0]["requests"]},
                                                indent=1) + "\n")
    Path(args.out).write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
