"""`avl eval` / `python -m avl.eval` (the same options; the latter for torchrun).

    avl eval --model DIR --task docvqa_val --data ~/data/DocVQA --policy avl --secondary 0.5 ...
    avl eval --model DIR --task textvqa_val --data ~/data/textvqa --sweep \\
        --grid "secondary=0.3,0.5 core=0.1,0.2 refresh_every=3 prefill_keep=0.9 text_keep=0.5,1.0" --baselines
    torchrun --nproc_per_node 4 -m avl.eval --model DIR --task vqav2_val --data ~/data/VQAv2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from avl.cache.policies import Full
from avl.cli_errors import OneLineErrorParser, add_debug_option, run_reporting_errors
from avl.cli_policies import add_policy_options, policy_from_args
from avl.eval.distributed import Dist
from avl.eval.runner import DTYPES, PTB_BACKENDS, EvalConfig, evaluate, load_for_eval, print_summary
from avl.eval.tasks import TASKS
from avl.families import FAMILIES

__all__ = ["add_eval_arguments", "add_eval_parser", "main", "run_eval"]

DESCRIPTION = ("Evaluate a model with a KV-cache policy on one of the A-VL paper's tasks (lmms-eval prompts and "
               "metrics), from local data; resumable; data-parallel under torchrun.")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `avl eval` (and of `python -m avl.eval`)."""
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--data", required=True,
                        help="directory of the hub dataset's parquet shards, a .parquet file, or a .jsonl file "
                             "(image paths relative to it)")
    parser.add_argument("--out", help="results folder (default: avl-eval/<task>/<policy>, or avl-eval/<task>/sweep)")
    parser.add_argument("--limit", type=int, help="only the first N samples")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="stop at the first sample that fails")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="decode under torch.compile(fullgraph=True)")
    parser.add_argument("--max-new-tokens", type=int, help="override the task's lmms-eval setting")
    parser.add_argument("--family", choices=list(FAMILIES),
                        help="override config.json's model_type for the prompt template (avl.families)")
    parser.add_argument("--ptb-tokenizer", choices=PTB_BACKENDS, default="python",
                        help="CIDEr tokenisation: the Python PTB approximation or the exact Java one (pycocoevalcap)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true", help="evaluate a grid of policies (see --grid)")
    sweep.add_argument("--grid", action="append", default=[],
                       help='"[policy:] field=v1,v2 ...", repeatable; e.g. "secondary=0.3,0.5 core=0.1 '
                            'refresh_every=3" (A-VL) or "fastv: keep=0.25,0.5"')
    sweep.add_argument("--baselines", action="store_true", help="add full, FastV, H2O and StreamingLLM to the sweep")
    sweep.add_argument("--no-plot", action="store_true", help="no sweep plot")
    add_policy_options(parser)
    add_debug_option(parser)


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to `avl`'s subparsers."""
    parser = subparsers.add_parser("eval", help="evaluate on DocVQA / TextVQA / OCRBench / NoCaps / Flickr30k / VQAv2",
                                   description=DESCRIPTION)
    add_eval_arguments(parser)
    return parser


def _config(args: argparse.Namespace, policy: Any, out: str) -> EvalConfig:
    return EvalConfig(model=args.model, task=args.task, data=args.data, policy=policy, out=out, limit=args.limit,
                      batch_size=args.batch_size, strict=args.strict, dtype=args.dtype, device=args.device,
                      compile=args.compile, max_new_tokens=args.max_new_tokens, family=args.family,
                      ptb_tokenizer=args.ptb_tokenizer, progress=not args.no_progress)


def run_eval(args: argparse.Namespace) -> int:
    """Run `avl eval` from parsed arguments; returns the exit status (2 on bad input, with a one-line
    message; `--debug` or AVL_DEBUG=1 raises instead)."""
    return run_reporting_errors("avl eval", args, lambda: _run_eval(args))


def _run_eval(args: argparse.Namespace) -> None:
    from avl.eval.sweep import policy_slug, run_sweep, sweep_policies

    dist = None
    try:
        policy = policy_from_args(args)
        if args.sweep:
            if policy != Full():
                raise ValueError("--sweep takes its policies from --grid / --baselines, "
                                 "not from --policy and its fields")
            policies, notes = sweep_policies(args.grid, args.baselines)
            out = args.out or str(Path("avl-eval") / args.task / "sweep")
            config = _config(args, Full(), out)
        else:
            if args.grid or args.baselines:
                raise ValueError("--grid / --baselines need --sweep")
            out = args.out or str(Path("avl-eval") / args.task / policy_slug(policy))
            config = _config(args, policy, out)
        dist = Dist.from_env()
        config = dataclasses.replace(config, device=dist.device(config.device))
        if args.sweep:
            if dist.is_main:
                for note in notes:
                    print(f"avl eval: {note}", file=sys.stderr)
            loaded = load_for_eval(config.model, config.dtype, config.device, config.family)
            run_sweep(config, policies, out, loaded=loaded, dist=dist, plot=not args.no_plot)
        else:
            summary = evaluate(config, dist=dist)
            if summary is not None:
                print_summary(summary)
                print(f"results: {out}")
    finally:
        if dist is not None:
            dist.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m avl.eval ...`."""
    parser = OneLineErrorParser(prog="python -m avl.eval", description=DESCRIPTION)
    add_eval_arguments(parser)
    sys.exit(run_eval(parser.parse_args(argv)))
