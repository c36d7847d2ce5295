"""`avl analyze`: the attention analysis of one image and prompt, or averaged over an eval task's samples.

    avl analyze --model DIR --image IMG --prompt TEXT --out DIR [--max-new-tokens N] [--top P] [--mass M]
    avl analyze --model DIR --sweep-data PARQUET_OR_JSONL --task flickr30k_test --limit 100 --out DIR

Writes `<out>/analysis.json` (the report; a sweep adds the task and each sample's tokens) and the
figures `shares.png` (not for Llama-3.2-Vision, whose report has no modal shares), `concentration.png`,
`ppci_layers.png`, `ppci_steps.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from avl.analysis.analyze import analyze
from avl.analysis.figures import write_figures
from avl.analysis.report import AttentionReport
from avl.analysis.sweep import analyze_task
from avl.cli_errors import add_debug_option, positive_int, run_reporting_errors
from avl.eval.data import open_dataset
from avl.eval.runner import load_for_eval
from avl.eval.tasks import TASKS, get_task
from avl.inputs import check_device
from avl.loading import DTYPES, load
from avl.processing.auto import load_chat_processor
from avl.weights import resolve_checkpoint

__all__ = ["add_analyze_parser", "run_analyze"]

DESCRIPTION = ("Attention analysis (the A-VL paper's Fig. 1, 3, 4, 5): per-modality attention shares, image "
               "attention concentration and PPCI of a greedy generation on the full cache; for one image and "
               "prompt, or averaged over an eval task's samples (--sweep-data). Llama-3.2-Vision: concentration "
               "and PPCI over its cross-attention layers' image features (no modal shares).")


def ratio(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is invalid; allowed: a ratio in (0, 1]")
    return value


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `analyze` subcommand to `avl`'s subparsers."""
    parser = subparsers.add_parser("analyze", help="attention shares, concentration and PPCI, with figures",
                                   description=DESCRIPTION)
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--out", required=True, help="directory for analysis.json and the figures")
    parser.add_argument("--image", help="image file (one-sample mode)")
    parser.add_argument("--prompt", help="the question (one-sample mode); the model family's chat template is applied")
    sweep = parser.add_argument_group("averaged over an eval task's samples")
    sweep.add_argument("--sweep-data", help="directory of the hub dataset's parquet shards, a .parquet or a .jsonl file")
    sweep.add_argument("--task", help=f"the task of --sweep-data, one of: {', '.join(TASKS)}")
    sweep.add_argument("--limit", type=positive_int, help="the first N samples (default 100, as in the paper)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="steps T: tokens generated (default 16)")
    parser.add_argument("--top", type=ratio, default=0.3, help="PPCI: share of image tokens in a top set (default 0.3)")
    parser.add_argument("--mass", type=ratio, default=0.8, help="concentration: attention mass to hold (default 0.8)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu")
    add_debug_option(parser)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    """Run `avl analyze` from parsed arguments; returns the exit status (2 on bad input, with one line
    `avl analyze: error: ...`; `--debug` or AVL_DEBUG=1 raises instead)."""
    return run_reporting_errors("avl analyze", args, lambda: _run(args))


def _check_arguments(args: argparse.Namespace) -> None:
    if args.sweep_data is None:
        stray = [name for name in ("task", "limit") if getattr(args, name) is not None]
        if stray:
            raise ValueError(f"--{stray[0]} belongs to --sweep-data; for one image pass --image and --prompt")
        missing = [name for name in ("image", "prompt") if getattr(args, name) is None]
        if missing:
            raise ValueError(f"--{missing[0]} is required (or --sweep-data with --task for an eval task's samples)")
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image!r}: no such file")
    else:
        stray = [name for name in ("image", "prompt") if getattr(args, name) is not None]
        if stray:
            raise ValueError(f"--{stray[0]} is for one image; --sweep-data takes the images and prompts of --task")
        if args.task is None:
            raise ValueError("--sweep-data needs --task (the eval task whose prompts and fields the data has)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file; allowed: a directory (created if missing)")


def _run(args: argparse.Namespace) -> None:
    _check_arguments(args)
    check_device(args.device)
    report, extra = _analyze_one(args) if args.sweep_data is None else _analyze_task(args)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps({**report.to_dict(), **extra}, indent=1) + "\n", encoding="utf-8")
    figures = write_figures(report, out)
    print(f"wrote {out / 'analysis.json'} and {', '.join(p.name for p in figures)}")


def _analyze_one(args: argparse.Namespace) -> tuple[AttentionReport, dict[str, Any]]:
    directory = resolve_checkpoint(args.model)
    model = load(directory, dtype=args.dtype, device=args.device)
    processor = load_chat_processor(directory)
    inputs = {k: v.to(args.device) for k, v in processor([args.prompt], [args.image]).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    report = analyze(model, **inputs, max_new_tokens=args.max_new_tokens, top=args.top, mass=args.mass)
    print(f"answer: {processor.decode(report.tokens)}")
    return report, {}


def _analyze_task(args: argparse.Namespace) -> tuple[AttentionReport, dict[str, Any]]:
    """The mean report; the JSON adds the task and each sample's index, id, N_img and tokens."""
    task = get_task(args.task)
    dataset = open_dataset(args.sweep_data, task)
    loaded = load_for_eval(args.model, dtype=args.dtype, device=args.device)
    limit = 100 if args.limit is None else args.limit
    report, samples = analyze_task(loaded, task, dataset, limit, args.max_new_tokens, args.top, args.mass,
                                   progress=not args.no_progress)
    return report, {"task": task.name, "per_sample": samples}
