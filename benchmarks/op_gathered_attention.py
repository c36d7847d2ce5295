"""Benchmark ``avl.ops.gathered_attention`` against three ways of writing the same decode step.

Shapes are LLaVA-1.6-7B decode (Vicuna-7B LM): Hq = Hkv = 32, D = 128, a cache of N = 2880 image +
100 text rows, of which M = 864 image rows (30%) + the 100 text rows are attended. Per batch size,
each method runs interleaved with the others (warm-up, then ``--repeats`` rounds; median reported):

- ``op``: ``avl.ops.gathered_attention(..., validate=False)`` (Triton on CUDA, torch on CPU);
- ``dense``: SDPA over all N rows (what an uncompressed cache costs; the ratios are against it);
- ``gather_sdpa``: gather the M rows (``k[b, h, idx]``) then SDPA over them (slice-then-matmul);
- ``masked_sdpa``: SDPA over all N rows with an additive ``-inf`` mask on the rows not selected
  (the mask is built once, outside the timing).

``GB/s`` is the same numerator for every method: the bytes the op has to move (the M selected K and V
rows per kv head, q, idx, out, probs) divided by the method's time. On CUDA, ``%peak`` relates it
to the device's peak memory bandwidth (table below or ``--peak-gbps``).

Usage: ``python benchmarks/op_gathered_attention.py [--device cuda] [--dtype float16]
[--batch 1 8 32] [--repeats 20] [--out benchmarks/results/op_gathered_attention.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from avl.ops import gathered_attention

H, D = 32, 128
N_IMAGE, N_TEXT = 2880, 100
KEEP_IMAGE = int(0.3 * N_IMAGE)  # 864
N, M = N_IMAGE + N_TEXT, KEEP_IMAGE + N_TEXT

# Peak memory bandwidth in GB/s by device-name substring; first match wins (specific names first).
PEAK_GBPS = [
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
    ("A100 80GB PCIe", 1935.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0),
    ("L40S", 864.0), ("L4", 300.0), ("A10G", 600.0), ("A10", 600.0), ("V100", 900.0), ("T4", 320.0),
    ("RTX 4090", 1008.0), ("RTX 3090", 936.0),
]


def make_inputs(batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, H, 1, D, generator=g).to(device, dtype)  # [B, H, 1, D]
    k = torch.randn(batch, H, N, D, generator=g).to(device, dtype)  # [B, H, N, D]
    v = torch.randn(batch, H, N, D, generator=g).to(device, dtype)  # [B, H, N, D]
    # Per (batch, head): a random 30% of the image rows, sorted, then all text rows.
    image = torch.rand(batch, H, N_IMAGE, generator=g).argsort(dim=-1)[..., :KEEP_IMAGE].sort(dim=-1).values
    text = torch.arange(N_IMAGE, N, dtype=torch.int64).expand(batch, H, N_TEXT)
    idx = torch.cat([image, text], dim=-1).to(device=device, dtype=torch.int32)  # [B, H, M]
    mask = torch.full((batch, H, 1, N), float("-inf"), dtype=dtype)  # [B, H, 1, N]
    mask.scatter_(3, idx.long().cpu().unsqueeze(2), 0.0)
    return {"q": q, "k": k, "v": v, "idx": idx, "mask": mask.to(device)}


def methods(x: dict[str, torch.Tensor]) -> dict[str, object]:
    q, k, v, idx, mask = x["q"], x["k"], x["v"], x["idx"], x["mask"]
    scale = D**-0.5
    b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1)  # [B, 1, 1]
    h = torch.arange(H, device=q.device).view(1, -1, 1)  # [1, H, 1]
    rows = idx.long()  # [B, H, M]

    def gather_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k[b, h, rows], v[b, h, rows], scale=scale)  # [B, H, 1, D]

    return {
        "op": lambda: gathered_attention(q, k, v, idx, scale, validate=False),
        "dense": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "gather_sdpa": gather_sdpa,
        "masked_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
    }


def op_bytes(batch: int, dtype: torch.dtype) -> int:
    """Bytes the op must move: M rows of K and V per kv head, q, idx, out and probs."""
    e = torch.empty((), dtype=dtype).element_size()
    p = 8 if dtype == torch.float64 else 4
    return batch * H * (2 * M * D * e + 2 * D * e + M * 4 + M * p)


def time_all(fns: dict[str, object], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call, methods interleaved round by round so drift hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def peak_gbps(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 9 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="default: 10 on CUDA, 2 on CPU")
    parser.add_argument("--peak-gbps", type=float, default=None, help="device peak memory bandwidth")
    parser.add_argument("--out", default="benchmarks/results/op_gathered_attention.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if on_cuda else "float32"))
    repeats = args.repeats or (50 if on_cuda else 9)
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    peak = peak_gbps(device, args.peak_gbps)
    desc = describe(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"device: {desc}; dtype {dtype}; torch {torch.__version__}; load average {load}")
    print(f"shapes: Hq=Hkv={H}, D={D}, N={N} ({N_IMAGE} image + {N_TEXT} text), M={M} "
          f"({KEEP_IMAGE} image + {N_TEXT} text); warm-up {warmup}, repeats {repeats}, median")

    header = f"{'batch':>5}  {'method':<12} {'ms':>9} {'vs dense':>9} {'GB/s':>8}" + ("  %peak" if peak else "")
    print(header)
    print("-" * len(header))
    results = []
    for batch in args.batch:
        x = make_inputs(batch, dtype, device)
        fns = methods(x)
        ref = fns["gather_sdpa"]()
        out, _ = fns["op"]()
        err = (out.float() - ref.float()).abs().max().item()
        times = time_all(fns, device, warmup, repeats)
        dense = statistics.median(times["dense"])
        nbytes = op_bytes(batch, dtype)
        for name, ts in times.items():
            med = statistics.median(ts)
            gbps = nbytes / (med * 1e-3) / 1e9
            row = {"batch": batch, "method": name, "median_ms": med, "times_ms": ts,
                   "ratio_vs_dense": med / dense, "op_bytes": nbytes, "gbps": gbps,
                   "pct_peak": 100 * gbps / peak if peak else None}
            results.append(row)
            line = f"{batch:>5}  {name:<12} {med:>9.3f} {med / dense:>8.2f}x {gbps:>8.1f}"
            print(line + (f"  {row['pct_peak']:5.1f}" if peak else ""))
        print(f"{'':>5}  (op vs gather_sdpa max |diff| = {err:.2e})")
        del x, fns, ref, out

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "device_name": desc, "dtype": str(dtype), "torch": torch.__version__,
            "load_average_1min_at_start": load,
            "H": H, "D": D, "N": N, "M": M, "warmup": warmup, "repeats": repeats, "peak_gbps": peak}
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
