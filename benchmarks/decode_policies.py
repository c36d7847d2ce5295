"""Decode-step time and KV bytes of every cache policy against the full cache, side by side.

The kvpress-pinned policies (SnapKV, PyramidKV, AdaKV, KNorm, ObservedAttention, Random) run at
keep 0.5, the share H2O 50% keeps, so that stored bytes and step times compare at one retained share.

Part 1 (measured): a Llama decoder with LLaVA-1.5-7B layer shapes (hidden 4096, 32 heads,
head_dim 128, MLP 11008) but `--layers` layers (default 4) and random weights, on a prompt of
1 system + 576 image + 40 text tokens (image rows are marked as such; the vision tower is not
part of decode). Every policy prefills the prompt once; its cache is repeated to each batch size
(a batch of equal prompts); then the policies decode in turn, step by step, so that load changes
hit all alike (median of `--steps` after `--warmup`). At batch 1 the weights dominate the bytes read per
step; the policies show at larger batch.

`--image-tokens 2880` times LLaVA-1.6-7B's prompt shape, `--image-tokens 256` Qwen-VL's.

Part 2 (computed, no weights allocated): the paper's Table-3 settings on the real LLaVA-1.5-7B
(576 image tokens), LLaVA-1.6-7B (2880) and Qwen-VL-7B (256) configs: a model with the real layer count and prompt
layout but tiny widths runs the policies; its cache rows are scaled to the real per-row bytes
(2 * 32 KV heads * 128 * 2 bytes, float16).

Usage: python benchmarks/decode_policies.py [--batch 1 8 32] [--layers 4] [--steps 8]
[--image-tokens 576] [--dtype float32] [--device cpu] [--out benchmarks/results/decode_policies.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import avl
from avl.cache.layout import PromptLayout
from avl.models.llama import LlamaConfig, LlamaModel

POLICIES = {
    "full": avl.Full(),
    "avl S45 C30 K3 P90 T50": avl.AVL(0.45, 0.30, 3, 0.9, 0.5),
    "avl S45 (no split)": avl.AVL(secondary=0.45),
    "fastv K2 R50": avl.FastV(layer=2, keep=0.5),
    "h2o 50%": avl.H2O(budget=0.5),
    "streaming 4+256": avl.StreamingLLM(sinks=4, window=256),
    "snapkv 50%": avl.SnapKV(0.5),
    "pyramidkv 50%": avl.PyramidKV(0.5),
    "adakv(snapkv) 50%": avl.AdaKV(avl.SnapKV(0.5)),
    "knorm 50%": avl.KNorm(0.5),
    "observed 50%": avl.ObservedAttention(0.5),
    "random 50%": avl.RandomEviction(0.5),
}
TABLE3 = {name: POLICIES[name] for name in ("full", "avl S45 C30 K3 P90 T50", "fastv K2 R50", "h2o 50%",
                                            "snapkv 50%", "pyramidkv 50%", "adakv(snapkv) 50%")}


def prompt_layout(batch: int, n_image: int, n_text: int, device: torch.device) -> PromptLayout:
    """1 system token, the image tokens, then text: the LLaVA-1.5 prompt shape."""
    length = 1 + n_image + n_text
    image = torch.zeros(batch, length, dtype=torch.bool, device=device)
    image[:, 1:1 + n_image] = True
    return PromptLayout.from_prompt(image, torch.ones(batch, length, dtype=torch.long, device=device))


def random_model(cfg: LlamaConfig, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(cfg).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model.eval()


def repeat_batch(cache: avl.ModalCache, batch: int) -> avl.ModalCache:
    """The cache of one prompt, repeated for `batch` identical prompts (the prefill at batch 1 is
    what a batch of equal prompts would build; it saves minutes of CPU prefill)."""
    def rep(x: object) -> object:
        if not isinstance(x, torch.Tensor):
            return x  # the layer's Budget
        return x.repeat_interleave(batch, dim=0) if x.dim() else x.clone()
    layers = [type(layer)(**{f.name: rep(getattr(layer, f.name)) for f in fields(layer)}) for layer in cache.layers]
    return avl.ModalCache(layers, cache.policy, rep(cache.next_position), rep(cache.full_rows), cache.new_tokens)


@dataclass
class Decoding:
    """One policy's generation in progress: its cache and the last token."""

    policy: avl.Policy
    cache: avl.ModalCache
    token: torch.Tensor

    def advance(self, model: LlamaModel) -> float:
        """One decode step (planned on the host, as `avl.generate` does); returns its wall time in seconds."""
        start = time.perf_counter()
        self.token = model.decode(self.token, self.cache, self.cache.next_step()).argmax(-1)
        if self.token.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def prefill(model: LlamaModel, layout: PromptLayout, policy: avl.Policy, new_tokens: int) -> Decoding:
    length = layout.modality.shape[1]
    embeds = torch.randn(1, length, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype,
                         device=layout.modality.device, generator=torch.Generator(layout.modality.device).manual_seed(0))
    logits, cache = model.prefill(embeds, layout, policy, new_tokens=new_tokens)
    return Decoding(policy, cache, logits.argmax(-1))


def byte_counts(cache: avl.ModalCache) -> dict:
    total = cache.stats().total
    return {"stored_bytes": total.stored_bytes, "used_bytes": total.used_bytes, "full_bytes": total.full_bytes,
            "allocated_bytes": total.allocated_bytes}


@torch.inference_mode()
def measured(args: argparse.Namespace) -> list[dict]:
    """Per batch size, every policy decodes in turn, step by step (round robin), so that load
    changes on a shared machine hit all policies alike; the median step time is reported."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                      num_attention_heads=32)
    model = random_model(cfg, dtype, device)
    layout = prompt_layout(1, args.image_tokens, 40, device)
    prefilled = {name: prefill(model, layout, p, args.warmup + args.steps + 1) for name, p in POLICIES.items()}
    rows = []
    for batch in args.batch:
        runs = {name: Decoding(d.policy, repeat_batch(d.cache, batch), d.token.repeat(batch))
                for name, d in prefilled.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for step in range(args.warmup + args.steps):
            for name, run in runs.items():
                elapsed = run.advance(model)
                if step >= args.warmup:
                    times[name].append(elapsed)
        results = {name: {"step_ms": 1e3 * statistics.median(times[name]), **byte_counts(run.cache)}
                   for name, run in runs.items()}
        full = results["full"]
        for name, r in results.items():
            rows.append({"batch": batch, "policy": name, **r, "speedup_vs_full": full["step_ms"] / r["step_ms"],
                         "stored_vs_full": r["stored_bytes"] / full["stored_bytes"],
                         "used_vs_full": r["used_bytes"] / full["used_bytes"]})
        del runs
    return rows


@torch.inference_mode()
def table3(new_tokens: int) -> list[dict]:
    """Cache bytes of the Table-3 settings on the real 7B configs, from a tiny-width stand-in."""
    real_row_bytes = 2 * 32 * 128 * 2  # K and V, 32 KV heads, head_dim 128, float16
    tiny = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=32,
                       num_attention_heads=1)
    model = random_model(tiny, torch.float32, torch.device("cpu"))
    tiny_row_bytes = 2 * 1 * 32 * 4
    rows = []
    # Qwen-VL-7B's LM has the same KV shape (32 layers, 32 heads x 128); its image is 256 tokens
    for name, n_image in (("llava-1.5-7b", 576), ("llava-1.6-7b", 2880), ("qwen-vl-7b", 256)):
        layout = prompt_layout(1, n_image, 40, torch.device("cpu"))
        for policy_name, policy in TABLE3.items():
            run = prefill(model, layout, policy, new_tokens)
            for _ in range(new_tokens - 1):
                run.advance(model)
            r = byte_counts(run.cache)
            scale = real_row_bytes / tiny_row_bytes
            rows.append({"model": name, "policy": policy_name, "new_tokens": new_tokens,
                         **{k: int(v * scale) for k, v in r.items() if k.endswith("bytes")},
                         "stored_pct": 100 * r["stored_bytes"] / r["full_bytes"],
                         "used_pct": 100 * r["used_bytes"] / r["full_bytes"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-tokens", type=int, default=576,
                        help="image tokens of the timed prompt: 576 LLaVA-1.5, 2880 LLaVA-1.6, 256 Qwen-VL")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--table3-tokens", type=int, default=32, help="generated tokens for the Table-3 bytes")
    parser.add_argument("--out", default="benchmarks/results/decode_policies.json")
    args = parser.parse_args()

    t3 = table3(args.table3_tokens)
    print(f"Table 3 settings, KV cache after {args.table3_tokens} generated tokens (float16, real 7B shapes):")
    print(f"{'model':<14} {'policy':<24} {'stored MB':>10} {'stored %':>9} {'used MB':>9} {'used %':>7}")
    for r in t3:
        print(f"{r['model']:<14} {r['policy']:<24} {r['stored_bytes'] / 2**20:>10.1f} {r['stored_pct']:>9.1f}"
              f" {r['used_bytes'] / 2**20:>9.1f} {r['used_pct']:>7.1f}")

    rows = measured(args)
    print(f"\nDecode step, 7B layer shapes x {args.layers} layers, {args.image_tokens} image + 40 text tokens,"
          f" {args.dtype} on {args.device}"
          f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads):")
    print(f"{'batch':>5} {'policy':<24} {'step ms':>9} {'speedup':>8} {'stored %':>9} {'used %':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['policy']:<24} {r['step_ms']:>9.1f} {r['speedup_vs_full']:>8.2f}"
              f" {100 * r['stored_vs_full']:>9.1f} {100 * r['used_vs_full']:>7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "layers": args.layers,
                               "image_tokens": args.image_tokens,
                               "threads": torch.get_num_threads(), "measured": rows, "table3": t3}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
