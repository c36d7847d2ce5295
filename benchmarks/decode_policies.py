"""Decode-step time and KV bytes of every cache policy against the full cache, side by side.

The kvpress-pinned policies (SnapKV, PyramidKV, AdaKV, KNorm, ObservedAttention, Random) and
VL-Cache run at keep 0.5, the share H2O 50% keeps, so that stored bytes and step times compare at
one retained share; PyramidDrop halves the image rows after layers 1, 2 and 3 (its 8/16/24 of 32
layers, scaled to the default 4). VisionZip selects in the vision tower, which this benchmark does
not run: at decode it is a prompt with `dominant + contextual` image rows.

Part 1 (measured): a Llama decoder with LLaVA-1.5-7B layer shapes (hidden 4096, 32 heads,
head_dim 128, MLP 11008) but `--layers` layers (default 4) and random weights, on a prompt of
1 system + 576 image + 40 text tokens (image rows are marked as such; the vision tower is not
part of decode). Every policy prefills the prompt once; its cache is repeated to each batch size
(a batch of equal prompts); then the policies decode in turn, step by step, so that load changes
hit all alike (median of `--steps` after `--warmup`). At batch 1 the weights dominate the bytes read per
step; the policies show at larger batch.

`--image-tokens 2880` times LLaVA-1.6-7B's prompt shape, `--image-tokens 256` Qwen-VL's.

Part 2 (computed, no weights allocated): the paper's Table-3 settings on the real LLaVA-1.5-7B
(576 image tokens), LLaVA-1.6-7B (2880) and Qwen-VL-7B (256) configs, Qwen2-VL-7B (28 layers, 4 KV
heads: GQA) at the image-token counts its processor gives a 640x480 photo, a 1024x768 image and a
1700x2200 document page, and LLaVA-OneVision-7B (Qwen2-7B: 28 layers, 4 KV heads) at the counts its
anyres_max_9 packing gives typical benchmark images (`ONEVISION_IMAGES`): a model with the real layer count and prompt layout but tiny widths runs
the policies; its cache rows are scaled to the real per-row bytes (2 * KV heads * 128 * 2 bytes, float16).

Usage: python benchmarks/decode_policies.py [--batch 1 8 32] [--layers 4] [--steps 8]
[--image-tokens 576] [--dtype float32] [--device cpu] [--out benchmarks/results/decode_policies.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import avl
from avl.cache.layout import PromptLayout
from avl.models.llama import LlamaConfig, LlamaModel
from avl.models.llava_onevision import LlavaOnevisionConfig
from avl.processing.llava_onevision import onevision_num_image_tokens
from avl.processing.qwen2_vl import Qwen2VLImageProcessor

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
    "vl-cache 50%": avl.VLCache(0.5),
    "pyramiddrop L1,2,3 R50": avl.PyramidDrop(layers=(1, 2, 3), keep=0.5),
}
TABLE3 = {name: POLICIES[name] for name in ("full", "avl S45 C30 K3 P90 T50", "fastv K2 R50", "h2o 50%",
                                            "snapkv 50%", "pyramidkv 50%", "adakv(snapkv) 50%", "vl-cache 50%")}
# LLaVA-OneVision benchmark images, (height, width): COCO-sized (VQAv2, captioning), a TextVQA photo, a DocVQA page
ONEVISION_IMAGES = {"coco 480x640": (480, 640), "textvqa 768x1024": (768, 1024), "docvqa 2200x1700": (2200, 1700)}


@dataclass(frozen=True)
class Table3Model:
    """A real model's decoder as far as its KV bytes go: layers, KV heads (head_dim 128), image tokens."""

    name: str
    layers: int
    kv_heads: int
    image_tokens: int


def table3_models() -> list[Table3Model]:
    """The Table-3 models; LLaVA-OneVision-7B's image-token counts from its own packing rule and default config."""
    models = [Table3Model("llava-1.5-7b", 32, 32, 576), Table3Model("llava-1.6-7b", 32, 32, 2880),
              # Qwen-VL-7B's LM has the same KV shape (32 layers, 32 heads x 128); its image is 256 tokens
              Table3Model("qwen-vl-7b", 32, 32, 256)]
    qwen2_vl = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)  # Qwen2-VL-7B-Instruct's pixel bounds
    models += [Table3Model(f"qwen2-vl-7b {w}x{h}", 28, 4, qwen2_vl.num_image_tokens(h, w))
               for w, h in ((640, 480), (1024, 768), (1700, 2200))]
    ov = LlavaOnevisionConfig.from_dict({"model_type": "llava_onevision"})  # transformers' defaults: the 7B's tower
    for image, size in ONEVISION_IMAGES.items():
        n = onevision_num_image_tokens(size, ov.image_grid_pinpoints, ov.vision.image_size, ov.vision.patch_size,
                                       ov.max_tiles, multi_image=False)
        models.append(Table3Model(f"llava-ov-7b {image}", 28, 4, n))  # Qwen2-7B: 28 layers, 4 KV heads
    return models


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
    return cache.repeat_interleave(batch)


@dataclass
class Decoding:
    """One policy's generation in progress: its cache and the last token."""

    policy: avl.Policy
    cache: avl.ModalCache
    token: torch.Tensor

    def advance(self, model: LlamaModel) -> float:
        """One decode step (the cache plans it: refresh or not, widths); returns its wall time in seconds."""
        step = self.cache.next_step()
        start = time.perf_counter()
        self.token = model.decode(self.token, self.cache, step).argmax(-1)
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
    """Cache bytes of the Table-3 settings on the real 7B configs, from tiny-width stand-ins (one KV head,
    the real layer count); rows and their scores are per KV head, so the counts do not depend on the width."""
    tiny_row_bytes = 2 * 1 * 32 * 4
    rows = []
    for real in table3_models():
        tiny = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=real.layers,
                           num_attention_heads=1)
        model = random_model(tiny, torch.float32, torch.device("cpu"))
        scale = 2 * real.kv_heads * 128 * 2 / tiny_row_bytes  # K and V, head_dim 128, float16
        layout = prompt_layout(1, real.image_tokens, 40, torch.device("cpu"))
        for policy_name, policy in TABLE3.items():
            run = prefill(model, layout, policy, new_tokens)
            for _ in range(new_tokens - 1):
                run.advance(model)
            r = byte_counts(run.cache)
            rows.append({"model": real.name, "image_tokens": real.image_tokens, "policy": policy_name,
                         "new_tokens": new_tokens, **{k: int(v * scale) for k, v in r.items() if k.endswith("bytes")},
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
    print(f"{'model':<30} {'image':>6} {'policy':<24} {'stored MB':>10} {'stored %':>9} {'used MB':>9} {'used %':>7}")
    for r in t3:
        print(f"{r['model']:<30} {r['image_tokens']:>6} {r['policy']:<24} {r['stored_bytes'] / 2**20:>10.1f}"
              f" {r['stored_pct']:>9.1f}"
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
