"""Prefill and decode-step time of avl's policies against the tools a user would pick instead.

One process, the same random weights, the methods' decode steps interleaved round by round (so
load drift on a shared machine hits all alike), median of `--steps` after `--warmup`:

- transformers: `LlamaForCausalLM` (sdpa attention, `DynamicCache`), the full cache;
- NVIDIA kvpress `SnapKVPress(compression_ratio=0.5)` on that model, when kvpress is importable
  (it pins transformers < 5.3: run this script in a venv of its own, `pip install torch==2.13.0 &&
  pip install -e '.[peers]'`);
- avl: Full, A-VL S45 C30 K3 P90 T50, H2O 50%, FastV K2 R50, StreamingLLM 4+256, on `LlamaModel`.

The model has LLaVA-1.5-7B's decoder layer shapes (hidden 4096, 32 heads of 128, MLP 11008,
vocabulary 32000) with `--layers` layers; the prompt is 1 system token, `--image-tokens` image
rows (576: LLaVA-1.5, 2880: LLaVA-1.6) and 40 text tokens, as embeddings (the vision tower is not
part of decode). Each method prefills at batch 1 (time to first token: after one untimed prefill
of each model, the fastest of `--prefill-repeats` interleaved rounds); its cache is
repeated to each batch size. "[attention]" rows time only the cache's part of avl's step (every
layer's `LayerCache.step` on random q/k/v, against avl full's): on a CPU the 7B layers' weights
dominate a step at small batch, and these rows show what the policy changes. Also measured: avl's step at `max_new_tokens` 32 vs 4096 at equal
tokens so far, and A-VL's core steps vs its refresh steps (with the rows each reads). A
configuration whose caches would not fit in `--memory-gb` is skipped and listed.

Usage: python benchmarks/decode_vs_peers.py [--batch 1 8 32] [--image-tokens 576 2880]
[--dtype float32 bfloat16] [--layers 3] [--steps 6] [--warmup 2] [--prefill-repeats 2] [--out benchmarks/results/decode_vs_peers.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import avl
from avl.cache.layout import PromptLayout
from avl.models.llama import LlamaConfig, LlamaModel

AVL_POLICIES = {
    "avl full": avl.Full(),
    "avl A-VL S45 C30 K3 P90 T50": avl.AVL(0.45, 0.30, 3, 0.9, 0.5),
    "avl H2O 50%": avl.H2O(budget=0.5),
    "avl FastV K2 R50": avl.FastV(layer=2, keep=0.5),
    "avl StreamingLLM 4+256": avl.StreamingLLM(sinks=4, window=256),
}
TEXT_TOKENS = 40


def transformers_model(layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    cfg = HFConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                   attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model.eval()


def avl_model(hf, layers: int) -> LlamaModel:
    """avl's Llama decoder on the SAME parameter tensors as the transformers model (no copy)."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, max_position_embeddings=8192)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def prompt(n_image: int) -> PromptLayout:
    length = 1 + n_image + TEXT_TOKENS
    image = torch.zeros(1, length, dtype=torch.bool)
    image[:, 1:1 + n_image] = True
    return PromptLayout.from_prompt(image, torch.ones(1, length, dtype=torch.long))


@dataclass
class Method:
    """A method's generation in progress: a decode step function and its timings."""

    name: str
    step: Callable[[], None]
    rows: Callable[[], float]  # KV rows the last step read, per sample and head (all layers)
    times: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


def hf_method(name: str, hf, cache, token: Tensor, batch: int, rows_of) -> Method:
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(batch)
    state = {"token": token.repeat(batch)}

    def step() -> None:
        out = hf(input_ids=state["token"][:, None], past_key_values=cache, use_cache=True)
        state["token"] = out.logits[:, -1].argmax(-1)

    return Method(name, step, lambda: rows_of(cache))


def attention_method(name: str, model: LlamaModel, cache: avl.ModalCache, batch: int, dtype: torch.dtype) -> Method:
    """Only the cache's part of a decode step (`LayerCache.step` of every layer: append, attend,
    update; a shifted cache also rotates its query, new key and sinks) on random q/k/v, on its own copy of the
    cache: what a policy changes in the step."""
    cache = cache.repeat_interleave(batch)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, 32, 1, 128, generator=g).to(dtype) for _ in range(3))
    method = Method(name, lambda: None, lambda: cache.stats().total.used_rows / batch)

    def step() -> None:
        plan = cache.next_step()
        method.kinds.append("refresh" if plan.refresh else "core")
        for block, layer, width in zip(model.layers, cache.layers, plan.widths):
            rotate = model.rotation(block.self_attn, cache.rotary_state) if layer.shifted else None
            layer.step(q, k, v, 128**-0.5, plan.refresh, width, rotate)

    method.step = step
    return method


def avl_method(name: str, model: LlamaModel, cache: avl.ModalCache, token: Tensor, batch: int) -> Method:
    cache = cache.repeat_interleave(batch)
    state = {"token": token.repeat(batch)}
    method = Method(name, lambda: None, lambda: cache.stats().total.used_rows / batch)

    def step() -> None:
        plan = cache.next_step()
        method.kinds.append("refresh" if plan.refresh else "core")
        state["token"] = model.decode(state["token"], cache, plan).argmax(-1)

    method.step = step
    return method


def dynamic_rows(cache) -> float:
    return float(sum(layer.keys.shape[2] for layer in cache.layers))


def run_round_robin(methods: list[Method], warmup: int, steps: int) -> None:
    for t in range(warmup + steps):
        for m in methods:
            start = time.perf_counter()
            m.step()
            elapsed = time.perf_counter() - start
            if t >= warmup:
                m.times.append(elapsed)
            elif m.kinds:
                m.kinds.pop()  # keep kinds aligned with the timed steps


def kv_gb(rows: int, batch: int, layers: int, dtype: torch.dtype) -> float:
    return 2 * rows * batch * layers * 32 * 128 * torch.tensor([], dtype=dtype).element_size() / 2**30


@torch.inference_mode()
def measure(dtype: torch.dtype, n_image: int, args: argparse.Namespace, kvpress) -> dict:
    hf = transformers_model(args.layers, dtype)
    model = avl_model(hf, args.layers)
    layout = prompt(n_image)
    embeds = torch.randn(1, layout.modality.shape[1], 4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    capacity = args.warmup + args.steps
    prefills: dict[str, Callable[[], object]] = {"transformers sdpa": lambda: hf(inputs_embeds=embeds, use_cache=True)}
    if kvpress is not None:
        press = kvpress.SnapKVPress(compression_ratio=0.5)

        def snapkv() -> object:
            with press(hf):
                return hf(inputs_embeds=embeds, use_cache=True)

        prefills["kvpress SnapKV 50%"] = snapkv
    for name, policy in AVL_POLICIES.items():
        prefills[name] = partial(model.prefill, embeds, layout, policy, capacity)
    # one untimed prefill of each model first (first touches of the weights, allocator growth), then
    # `--prefill-repeats` interleaved rounds; the fastest of each method's rounds is reported
    prefills["transformers sdpa"]()
    prefills["avl full"]()
    timed: dict[str, list[float]] = {name: [] for name in prefills}
    results: dict[str, object] = {}
    for _ in range(args.prefill_repeats):
        for name, run in prefills.items():
            start = time.perf_counter()
            results[name] = run()
            timed[name].append(time.perf_counter() - start)
    prefill_ms = {name: 1e3 * min(times) for name, times in timed.items()}
    out = results.pop("transformers sdpa")
    hf_cache, hf_token = out.past_key_values, out.logits[:, -1].argmax(-1)
    snap = None
    if kvpress is not None:
        out = results.pop("kvpress SnapKV 50%")
        snap = (out.past_key_values, out.logits[:, -1].argmax(-1))
    caches = {name: (cache, logits.argmax(-1)) for name, (logits, cache) in results.items()}
    sized = {n: model.prefill(embeds, layout, avl.Full(), n) for n in (32, 4096)}

    rows = []
    skipped = []
    length = layout.modality.shape[1]
    for batch in args.batch:
        need = kv_gb(length + capacity, batch, args.layers, dtype) * (2 + 2.5)  # a group: two full caches + the others
        if need > args.memory_gb:
            skipped.append({"batch": batch, "needed_gb": round(need, 1)})
            continue
        def whole_steps() -> list[Method]:
            methods = [hf_method("transformers sdpa", hf, hf_cache, hf_token, batch, dynamic_rows)]
            if snap is not None:
                methods.append(hf_method("kvpress SnapKV 50%", hf, snap[0], snap[1], batch, dynamic_rows))
            return methods + [avl_method(name, model, cache, token, batch) for name, (cache, token) in caches.items()]

        def attention_steps() -> list[Method]:
            return [attention_method(f"{name} [attention]", model, cache, batch, dtype)
                    for name, (cache, _) in caches.items()]

        # one group at a time, so that only its caches are held: whole steps (interleaved), then the cache's part
        for group in (whole_steps, attention_steps):
            methods = group()
            run_round_robin(methods, args.warmup, args.steps)
            full = next(m for m in methods if m.name.startswith("avl full"))
            for m in methods:
                ms = 1e3 * statistics.median(m.times)
                row = {"batch": batch, "method": m.name, "step_ms": ms,
                       "vs_transformers": ms / (1e3 * statistics.median(methods[0].times))
                       if group is whole_steps else None,
                       "vs_avl_full": ms / (1e3 * statistics.median(full.times)), "rows_last_step": m.rows()}
                if m.kinds and "refresh" in m.kinds:
                    by = {k: [t for t, kind in zip(m.times, m.kinds) if kind == k] for k in ("core", "refresh")}
                    row["core_step_ms"] = 1e3 * statistics.median(by["core"])
                    row["refresh_step_ms"] = 1e3 * statistics.median(by["refresh"])
                rows.append(row)
            del methods

    # capacity: the same full cache sized for 32 or 4096 new tokens, same tokens so far
    cap = [avl_method(f"avl full, max_new_tokens={n}", model, cache, logits.argmax(-1), 1)
           for n, (logits, cache) in sized.items()]
    run_round_robin(cap, args.warmup, args.steps)
    capacity_rows = [{"method": m.name, "step_ms": 1e3 * statistics.median(m.times)} for m in cap]
    return {"dtype": str(dtype).removeprefix("torch."), "image_tokens": n_image, "prefill_ms": prefill_ms,
            "decode": rows, "capacity": capacity_rows, "skipped": skipped}


def print_result(r: dict) -> None:
    print(f"\n{r['image_tokens']} image tokens, {r['dtype']}: prefill at batch 1 (ms)")
    base = r["prefill_ms"]["transformers sdpa"]
    for name, ms in r["prefill_ms"].items():
        print(f"  {name:<30} {ms:>9.0f}  {ms / base:>5.2f}x transformers")
    print(f"{'batch':>5} {'method':<42} {'step ms':>9} {'/transf.':>9} {'/avl full':>9} {'rows read':>10}")
    for d in r["decode"]:
        extra = ""
        if "core_step_ms" in d:
            extra = f"   core {d['core_step_ms']:.0f} ms, refresh {d['refresh_step_ms']:.0f} ms"
        vs = "" if d["vs_transformers"] is None else f"{d['vs_transformers']:.2f}"
        print(f"{d['batch']:>5} {d['method']:<42} {d['step_ms']:>9.1f} {vs:>9}"
              f" {d['vs_avl_full']:>9.2f} {d['rows_last_step']:>10.0f}{extra}")
    for c in r["capacity"]:
        print(f"      {c['method']:<36} {c['step_ms']:>9.1f} ms")
    for s in r["skipped"]:
        print(f"  skipped batch {s['batch']}: its caches need about {s['needed_gb']} GB (> --memory-gb)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[576, 2880])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefill-repeats", type=int, default=2, help="timed prefill rounds (the fastest is reported)")
    parser.add_argument("--memory-gb", type=float, default=14.0, help="skip batch sizes whose caches need more")
    parser.add_argument("--out", default="benchmarks/results/decode_vs_peers.json")
    args = parser.parse_args()
    try:
        import kvpress
    except ImportError:
        kvpress = None
        print("kvpress is not importable here: its SnapKV column is skipped (see the module docstring)")
    import transformers

    print(f"load average at start: {os.getloadavg()}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}"
          + (f", kvpress {kvpress.__version__}" if kvpress is not None and hasattr(kvpress, "__version__") else ""))
    results = []
    for dtype in args.dtype:
        for n_image in args.image_tokens:
            results.append(measure(getattr(torch, dtype), n_image, args, kvpress))
            print_result(results[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"layers": args.layers, "threads": torch.get_num_threads(),
                               "load_average_end": os.getloadavg(), "results": results}, indent=1))
    print(f"\nload average at end: {os.getloadavg()}\nwrote {out}")


if __name__ == "__main__":
    main()
