"""Llama-3.2-11B-Vision: KV bytes and decode-step time of the full cache vs Trim (Trimmed Llama), side by side.

Part 1 (computed, no weights allocated): the KV cache of the real config (40 layers, 8 of them
cross-attention at 3, 8, ..., 38; hidden 4096; 32 query / 8 KV heads of 128; one image of 4 tiles
x 1601 feature rows). A stand-in with the real depth, cross-attention layer indices, GQA layout and
image rows but tiny widths runs prefill and decode under each policy through the real code paths
(`Trim`'s selection, A-VL's text H2O); its `cache.stats()` rows are scaled to the real bytes per
row (K and V, 8 KV heads x 128, bfloat16). Text (self-attention) and image (cross-attention) bytes
are reported separately. (The "head_union" criterion is left out: each head keeps its own top
rows and the union adapts to how much the heads agree, which random weights do not model.)

Part 2 (measured): decode-step time on a reduced-depth random model at FULL width: 2 self-attention
+ 1 cross-attention layer (order self, cross, self; hidden 4096, 32/8 heads, MLP 14336, vocabulary
128256), the image as 6404 random projected feature rows (the vision encoder is not part of
decode). Each policy prefills one prompt; its cache is repeated to each batch size; then the
policies' decode steps are interleaved round by round and the median (and min) of `--steps` is
reported, with the time of one decode token's attention over one cross-attention layer's cached
image K/V alone (the part Trim shortens). In the real model 8 of 40 layers cross-attend,
so the share of the step that Trim shortens is larger there than in this 3-layer stand-in.

Usage: python benchmarks/decode_mllama.py [--batch 1 8 32] [--steps 6] [--warmup 2] [--dtype float32]
[--device cpu] [--text-tokens 40] [--new-tokens 32] [--out benchmarks/results/decode_mllama.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from avl.cache.layout import PromptLayout
from avl.cache.modal_cache import ModalCache
from avl.cache.policies import AVL, Full, Policy
from avl.cache.trim import Trim
from avl.models.mllama import ImageContext, MllamaConfig, MllamaTextConfig, MllamaTextModel, cross_attention

# config.json of meta-llama/Llama-3.2-11B-Vision (the fields that shape the cache)
LLAMA_32_11B_VISION = {
    "model_type": "mllama",
    "image_token_index": 128256,
    "text_config": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    },
    "vision_config": {
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_global_layers": 8,
        "attention_heads": 16, "image_size": 560, "patch_size": 14, "max_num_tiles": 4,
        "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680,
    },
}

POLICIES: dict[str, tuple[Policy, Trim | None]] = {  # (sequence policy, feature policy)
    "full": (Full(), None),
    "trim 50% (sum)": (Full(), Trim(keep=0.5, criterion="sum")),
    "trim 50% + AVL text 50%": (AVL(text_keep=0.5), Trim(keep=0.5, criterion="sum")),
}
TIMED = ("full", "trim 50% (sum)")
SYSTEM = 5  # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n before <|image|>


def prompt(text_tokens: int, image_rows: int, batch: int, device: torch.device) -> tuple[PromptLayout, Tensor]:
    """Layout of `SYSTEM` tokens, `<|image|>`, then text, and the cross-attention mask over `image_rows`
    feature rows (every row from `<|image|>` on attends the whole image) [B, L, N]."""
    length = SYSTEM + 1 + text_tokens
    image_token = torch.zeros(batch, length, dtype=torch.bool, device=device)
    image_token[:, SYSTEM] = True
    layout = PromptLayout.from_prompt(image_token, torch.ones(batch, length, dtype=torch.long, device=device))
    text_mask = torch.zeros(batch, length, image_rows, dtype=torch.bool, device=device)
    text_mask[:, SYSTEM:] = True
    return layout, text_mask


def image_context(features: Tensor, text_mask: Tensor) -> ImageContext:
    b, n = features.shape[:2]
    present = torch.ones(b, n, dtype=torch.bool, device=features.device)
    rows = torch.arange(n, device=features.device).expand(b, n)
    return ImageContext(features, text_mask, present.clone(), present, rows, present.sum(-1))


def random_text_model(cfg: MllamaTextConfig, dtype: torch.dtype, device: torch.device,
                      seed: int = 0) -> MllamaTextModel:
    """Built on the meta device, then filled in place (uniform, std 0.02): no default init of 7 GB of weights."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MllamaTextModel(cfg).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5)
            else:
                p.fill_(0.5 if "gate" in name else 1.0)  # open the tanh gates so the image matters
    return model.eval()


def repeat_batch(cache: ModalCache, batch: int) -> ModalCache:
    """The cache of one prompt, repeated for `batch` identical prompts (the prefill at batch 1 is
    what a batch of equal prompts would build; it saves minutes of CPU prefill)."""
    return cache.repeat_interleave(batch)


# ---------------------------------------------------------------- part 1: KV bytes of the real config

@torch.inference_mode()
def real_kv_bytes(text_tokens: int, new_tokens: int) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and never oversubscribes a busy machine
    try:
        return _real_kv_bytes(text_tokens, new_tokens)
    finally:
        torch.set_num_threads(threads)


def _real_kv_bytes(text_tokens: int, new_tokens: int) -> list[dict]:
    real = MllamaConfig.from_dict(LLAMA_32_11B_VISION)
    image_rows = real.vision.max_num_tiles * real.vision.tokens_per_tile  # 4 x 1601
    row_bytes = 2 * real.text.num_key_value_heads * real.text.head_dim * 2  # K+V, bfloat16
    tiny = replace(real.text, vocab_size=64, hidden_size=64, intermediate_size=64)  # 32 / 8 heads of 2
    model = random_text_model(tiny, torch.float32, torch.device("cpu"))
    tiny_row_bytes = 2 * tiny.num_key_value_heads * tiny.head_dim * 4
    layout, text_mask = prompt(text_tokens, image_rows, 1, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, image_rows, tiny.hidden_size, generator=g)
    embeds = torch.randn(1, layout.modality.shape[1], tiny.hidden_size, generator=g)
    out = []
    for name, policy in POLICIES.items():
        logits, cache = model.prefill(embeds, layout, policy[0], new_tokens - 1, image_context(features, text_mask),
                                      policy[1])
        token = logits.argmax(-1)
        for _ in range(new_tokens - 1):
            token = model.decode(token, cache).argmax(-1)
        stats = cache.stats()
        text, image = stats.total_of("self"), stats.total_of("cross")
        scale = row_bytes / tiny_row_bytes
        out.append({"policy": name, "text_bytes": int(text.stored_bytes * scale),
                    "image_bytes": int(image.stored_bytes * scale), "full_text_bytes": int(text.full_bytes * scale),
                    "full_image_bytes": int(image.full_bytes * scale), "image_rows_kept": stats.layers[-1].stored_rows,
                    "image_rows": image_rows})
    return out


# ---------------------------------------------------------------- part 2: measured decode step

def measured_config() -> MllamaTextConfig:
    real = MllamaConfig.from_dict(LLAMA_32_11B_VISION).text
    return replace(real, num_hidden_layers=3, cross_attention_layers=(1,))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measured(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = measured_config()
    model = random_text_model(cfg, dtype, device)
    real = MllamaConfig.from_dict(LLAMA_32_11B_VISION).vision
    image_rows = real.max_num_tiles * real.tokens_per_tile
    layout, text_mask = prompt(args.text_tokens, image_rows, 1, device)
    g = torch.Generator(device=device).manual_seed(1)
    features = torch.randn(1, image_rows, cfg.hidden_size, generator=g, device=device, dtype=dtype)
    embeds = torch.randn(1, layout.modality.shape[1], cfg.hidden_size, generator=g, device=device, dtype=dtype)
    capacity = args.warmup + args.steps
    prefilled = {}
    for name in TIMED:
        policy, features_policy = POLICIES[name]
        logits, cache = model.prefill(embeds, layout, policy, capacity, image_context(features, text_mask),
                                      features_policy)
        prefilled[name] = (logits.argmax(-1), cache)
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    rows = []
    for batch in args.batch:
        state = {name: (token.repeat(batch), repeat_batch(cache, batch)) for name, (token, cache) in prefilled.items()}
        step_times: dict[str, list[float]] = {name: [] for name in TIMED}
        attn_times: dict[str, list[float]] = {name: [] for name in TIMED}
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        for t in range(args.warmup + args.steps):
            for name in TIMED:  # interleaved: drift hits both alike
                token, cache = state[name]
                layer_cache = cache.cross[0]
                sync(device)
                start = time.perf_counter()
                token = model.decode(token, cache).argmax(-1)
                sync(device)
                middle = time.perf_counter()
                cross_attention(q, layer_cache.k, layer_cache.v, layer_cache.decode_allowed[:, None], head_dim**-0.5)
                sync(device)
                end = time.perf_counter()
                state[name] = (token, cache)
                if t >= args.warmup:
                    step_times[name].append(middle - start)
                    attn_times[name].append(end - middle)
        for name in TIMED:
            stats = state[name][1].stats()
            rows.append({"batch": batch, "policy": name, "step_ms": 1e3 * statistics.median(step_times[name]),
                         "step_ms_min": 1e3 * min(step_times[name]),
                         "cross_attention_ms": 1e3 * statistics.median(attn_times[name]),
                         "cross_attention_ms_min": 1e3 * min(attn_times[name]),
                         "image_kv_bytes": stats.total_of("cross").stored_bytes,
                         "text_kv_bytes": stats.total_of("self").stored_bytes,
                         "image_rows": int(state[name][1].cross[0].k.shape[2])})
        del state
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--text-tokens", type=int, default=40, help="prompt text tokens after <|image|>")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens for the KV bytes")
    parser.add_argument("--out", default="benchmarks/results/decode_mllama.json")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")

    kv = real_kv_bytes(args.text_tokens, args.new_tokens)
    full = kv[0]
    print(f"\nLlama-3.2-11B-Vision KV cache per sample, bfloat16, prompt {SYSTEM + 1 + args.text_tokens} tokens + "
          f"{args.new_tokens} generated, one image of 4 tiles (computed, no weights):")
    print(f"{'policy':<26} {'text MB':>8} {'image MB':>9} {'total MB':>9} {'% full':>7} {'image rows':>11}")
    for r in kv:
        total = r["text_bytes"] + r["image_bytes"]
        print(f"{r['policy']:<26} {r['text_bytes'] / 2**20:>8.1f} {r['image_bytes'] / 2**20:>9.1f}"
              f" {total / 2**20:>9.1f} {100 * total / (full['text_bytes'] + full['image_bytes']):>7.1f}"
              f" {r['image_rows_kept']:>6.0f}/{r['image_rows']}")

    rows = measured(args)
    print(f"\nDecode step, reduced depth at full width (2 self + 1 cross layers, hidden 4096, vocab 128256), "
          f"{args.dtype} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), median of {args.steps}:")
    print(f"{'batch':>5} {'policy':<16} {'step ms':>9} {'(min)':>8} {'speedup':>8} {'x-attn ms':>10} {'(min)':>8}"
          f" {'speedup':>8} {'image KV MB':>12} {'rows':>5}")
    by_batch = {}
    for r in rows:
        base = by_batch.setdefault(r["batch"], r)
        r["step_speedup"] = base["step_ms"] / r["step_ms"]
        r["cross_attention_speedup"] = base["cross_attention_ms"] / r["cross_attention_ms"]
        print(f"{r['batch']:>5} {r['policy']:<16} {r['step_ms']:>9.1f} {r['step_ms_min']:>8.1f}"
              f" {r['step_speedup']:>8.2f} {r['cross_attention_ms']:>10.2f} {r['cross_attention_ms_min']:>8.2f}"
              f" {r['cross_attention_speedup']:>8.2f} {r['image_kv_bytes'] / 2**20:>12.1f} {r['image_rows']:>5}")
    print("x-attn: the attention of one decode token over one cross-attention layer's cached image K/V (the part Trim"
          " shortens; the real model has 8 such layers)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                               "load_average": os.getloadavg(), "kv_bytes_11b": kv, "measured": rows,
                               "measured_model": "3 layers (self, cross, self) at Llama-3.2-11B-Vision width"},
                              indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
