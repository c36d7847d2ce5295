"""Offline evaluation: the A-VL paper's six lmms-eval tasks, their metrics, policy sweeps, torchrun.

    from avl.eval import EvalConfig, evaluate
    summary = evaluate(EvalConfig(model="llava-hf/llava-1.5-7b-hf", task="docvqa_val", data="~/data/DocVQA",
                                  policy=avl.AVL(0.45, 0.30, 3, 0.9, 0.5), out="runs/docvqa-avl"))

Modules: ``tasks`` (prompts, generation settings, scoring per task, with their lmms-eval sources),
``data`` (hub parquet shards / jsonl), ``results``
(resumable per-sample files, summary), ``runner`` (``evaluate``), ``sweep``, ``distributed``,
``cli`` (``avl eval`` / ``python -m avl.eval``), ``metrics``. The prompt and output rules per model_type
are in :mod:`avl.families` (re-exported here: ``FAMILIES``, ``Family``, ``get_family``).
"""

from avl.eval.data import DataError, SampleError, open_dataset
from avl.eval.results import RunMismatchError
from avl.eval.runner import EvalConfig, LoadedModel, evaluate, load_for_eval
from avl.eval.sweep import parse_grid, run_sweep
from avl.eval.tasks import TASKS, Task, TaskError, get_task
from avl.families import FAMILIES, Family, get_family

__all__ = [
    "FAMILIES",
    "TASKS",
    "DataError",
    "EvalConfig",
    "Family",
    "LoadedModel",
    "RunMismatchError",
    "SampleError",
    "Task",
    "TaskError",
    "evaluate",
    "get_family",
    "get_task",
    "load_for_eval",
    "open_dataset",
    "parse_grid",
    "run_sweep",
]
