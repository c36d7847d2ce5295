"""Efficiency per sample and per run: time to first token, time per output token, KV cache bytes,
peak memory.

A record's ``efficiency`` (:func:`record_efficiency`, from :class:`avl.generate.GenerationOutput`):

* ``ttft_s``: time to first token, ``timings.prefill_s``: the prefill up to the first token's
  logits (tokenisation and image preprocessing not included);
* ``time_per_token_s``: time per output token after the first, the mean of ``timings.step_s``
  (one entry per decode step); ``None`` when no decode step ran (one token generated);
* ``decode_steps``: the number of decode steps, ``len(timings.step_s)``;
* ``peak_memory_bytes`` and ``peak_memory_source``: on CUDA ``"cuda_max_memory_allocated"``, the
  allocator's peak during the sample's generation (reset before it; the weights are part of it); on CPU
  ``"process_rss_high_water"``, the process's resident-set high-water mark at the end of the
  sample's generation (``getrusage(RUSAGE_SELF).ru_maxrss``): it never goes down, so it is the peak
  of the whole process so far (weights, earlier samples), not of this sample alone. ``None`` on
  other devices.

With ``batch_size > 1`` these are the batch's: every sample of a batch waits for its prefill and
for each of its decode steps, which run until the batch's longest answer ends.

The KV bytes of a sample are the record's ``kv`` (``stored_bytes``, ``used_bytes``: after the last
step, summed over layers; see :mod:`avl.eval.runner`).

The summary's ``efficiency`` (:func:`efficiency_summary`): ``ttft_s`` and ``time_per_token_s``,
means over the samples (per-token: over those with a decode step, ``None`` if none had one);
``kv_stored_bytes`` / ``kv_used_bytes``, means over the samples; ``peak_memory_bytes``, the largest
of the samples'; ``timed_samples``, how many records carry an ``efficiency`` (results written before
it existed do not).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from avl.generate import Timings

__all__ = ["efficiency_summary", "peak_memory", "record_efficiency", "reset_peak_memory"]

CUDA_SOURCE = "cuda_max_memory_allocated"
RSS_SOURCE = "process_rss_high_water"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA allocator peak (the CPU's process high-water mark cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int | None, str | None]:
    """(bytes, source): the CUDA allocator's peak since :func:`reset_peak_memory`, or on CPU the
    process's resident-set high-water mark (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), CUDA_SOURCE
    if device.type == "cpu":
        high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return high_water * (1 if sys.platform == "darwin" else 1024), RSS_SOURCE
    return None, None


def record_efficiency(timings: Timings, device: torch.device) -> dict[str, Any]:
    """A record's ``efficiency`` from a generation's timings, its peak memory read now."""
    steps = timings.step_s
    peak, source = peak_memory(device)
    return {"ttft_s": timings.prefill_s, "time_per_token_s": sum(steps) / len(steps) if steps else None,
            "decode_steps": len(steps), "peak_memory_bytes": peak, "peak_memory_source": source}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def efficiency_summary(records: Sequence[Mapping[str, Any]], kv_means: Mapping[str, float] | None) -> dict[str, Any]:
    """The run's efficiency over successful `records` (see the module docstring); `kv_means`: the
    mean of each of their ``kv`` fields (None when none has one)."""
    timed = [r["efficiency"] for r in records if r.get("efficiency")]
    peaks = [e["peak_memory_bytes"] for e in timed if e["peak_memory_bytes"] is not None]
    sources = sorted({e["peak_memory_source"] for e in timed if e["peak_memory_source"] is not None})
    return {
        "ttft_s": _mean([e["ttft_s"] for e in timed]),
        "time_per_token_s": _mean([e["time_per_token_s"] for e in timed if e["time_per_token_s"] is not None]),
        "kv_stored_bytes": kv_means["stored_bytes"] if kv_means else None,
        "kv_used_bytes": kv_means["used_bytes"] if kv_means else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_source": ", ".join(sources) or None,
        "timed_samples": len(timed),
    }
