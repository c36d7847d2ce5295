"""Command line: `avl generate` (a checkpoint, one or more images, a prompt), `avl demo` (no downloads), `avl eval`,
`avl analyze` (attention analysis)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from avl.analysis.cli import add_analyze_parser, run_analyze
from avl.cache.policies import FeaturePolicy, Policy, split_policy
from avl.cli_errors import OneLineErrorParser, add_debug_option, positive_int, run_reporting_errors
from avl.cli_policies import add_policy_options, policy_from_args
from avl.eval.cli import add_eval_parser, run_eval
from avl.families import FAMILIES
from avl.generate import generate
from avl.inputs import check_device
from avl.loading import DTYPES, load
from avl.processing.auto import load_chat_processor
from avl.processing.streaming import TextStreamer
from avl.weights import resolve_checkpoint


def run_generate(model_dir: str | Path, images: Sequence[str | Path], prompt: str, policy: Policy | FeaturePolicy,
                 args: argparse.Namespace) -> None:
    """Answer `prompt` about `images` (all in one prompt, in order) and print the answer and the cache table;
    with `args.stream` the answer is printed as its tokens are generated."""
    directory = resolve_checkpoint(model_dir)
    model = load(directory, dtype=args.dtype, device=args.device)
    processor = load_chat_processor(directory)
    inputs = {k: v.to(args.device) for k, v in processor([prompt], [list(images)]).items()}
    sequence_policy, feature_policy = split_policy(policy)
    streamer = TextStreamer(processor.decode)
    on_token = None
    if args.stream:
        print("answer: ", end="", flush=True)

        def on_token(token: torch.Tensor) -> None:
            print(streamer.push(int(token[0])), end="", flush=True)

    out = generate(model, **inputs, policy=sequence_policy, feature_policy=feature_policy, max_new_tokens=args.max_new_tokens,
                   eos_token_id=list(processor.stop_token_ids), compile=args.compile, on_token=on_token)
    print(streamer.flush() if args.stream else f"answer: {processor.decode(out.tokens[0])}")
    print(f"\npolicy: {policy}\nKV cache after the last step (rows per sample and KV head; MB for the batch):")
    print(out.stats.table())


def build_parser() -> argparse.ArgumentParser:
    """The `avl` command line: `generate`, `demo`, `eval`, `analyze`."""
    parser = OneLineErrorParser(prog="avl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="answer a prompt about one or more images")
    gen.add_argument("--model", required=True,
                     help=f"checkpoint directory or hub id, in the hub's layout; config.json's model_type one of: "
                          f"{', '.join(FAMILIES)}")
    gen.add_argument("--image", required=True, action="append",
                     help="image file; repeat for several images in one prompt (shown in this order, before the "
                          "prompt)")
    gen.add_argument("--prompt", required=True)

    demo = commands.add_parser("demo", help="build a tiny RANDOM LLaVA-1.5 locally and run the whole pipeline")
    demo.add_argument("--out", help="an empty or new directory for the tiny checkpoint (default: a temporary one)")
    demo.add_argument("--overwrite", action="store_true",
                      help="write into --out even if it is not empty (its config, tokenizer and weights files "
                           "are replaced)")
    demo.add_argument("--prompt", default="What is shown in this image?")
    add_eval_parser(commands)
    add_analyze_parser(commands)

    for sub in (gen, demo):
        sub.add_argument("--max-new-tokens", type=positive_int, default=32)
        sub.add_argument("--dtype", choices=DTYPES, default="float32")
        sub.add_argument("--device", default="cpu")
        sub.add_argument("--compile", action="store_true", help="run decode under torch.compile(fullgraph=True)")
        sub.add_argument("--stream", action="store_true", help="print the answer as its tokens are generated")
        add_policy_options(sub)
        add_debug_option(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """`avl ...`: exits 2 with one line `avl <cmd>: error: ...` on a user error (see `avl.cli_errors`)."""
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        sys.exit(run_eval(args))
    if args.command == "analyze":
        status = run_analyze(args)
    else:
        status = run_reporting_errors(f"avl {args.command}", args, lambda: _run(args))
    if status:
        sys.exit(status)


def _run(args: argparse.Namespace) -> None:
    policy = policy_from_args(args)
    check_device(args.device)
    if args.command == "generate":
        for image in args.image:
            if not Path(image).is_file():
                raise FileNotFoundError(f"--image {image!r}: no such file")
        run_generate(args.model, args.image, args.prompt, policy, args)
    else:
        run_demo(policy, args)


def check_demo_out(out: str | None, overwrite: bool) -> None:
    """Refuse a `--out` that is a file, or a non-empty directory without `--overwrite`: the demo's
    config.json, tokenizer files and model.safetensors would replace the user's (and in a sharded
    checkpoint its model.safetensors would shadow the index)."""
    if out is None:
        return
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {str(path)!r} is a file; allowed: an empty or new directory")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise FileExistsError(f"--out {str(path)!r} is not empty ({shown}); the demo would overwrite its "
                              "config.json, tokenizer and weights files. Use an empty or new directory, or pass "
                              "--overwrite")


def run_demo(policy: Policy | FeaturePolicy, args: argparse.Namespace) -> None:
    from PIL import Image

    from avl.testing.llava_checkpoint import build_tiny_llava

    check_demo_out(args.out, args.overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        print(f"Building a tiny LLaVA-1.5 with RANDOM weights in {out} (no download): the pipeline, shapes and "
              "cache accounting are real (576 image tokens), the answer is noise.\n", file=sys.stderr)
        build_tiny_llava(out)
        image = out / "demo.png"
        gradient = torch.linspace(0, 255, 400).to(torch.uint8)
        pixels = torch.stack([gradient[None, :].expand(300, -1), gradient[:300, None].expand(-1, 400),
                              torch.full((300, 400), 128, dtype=torch.uint8)], dim=-1)
        Image.fromarray(pixels.numpy()).save(image)
        run_generate(out, [image], args.prompt, policy, args)


if __name__ == "__main__":
    main()
