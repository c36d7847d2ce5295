"""Gathered attention: one new query token attends over a listed subset of cached rows.

``avl.ops.gathered_attention(q, k, v, idx, scale)`` validates its inputs and calls the custom op
``torch.ops.avl.gathered_attention`` (registered in :mod:`avl.ops.gathered_attention`), which
``torch.compile(fullgraph=True)`` keeps as one opaque node. Kernels: plain torch
(:mod:`avl.ops.reference`; CPU, and float64 anywhere) and Triton (:mod:`avl.ops.triton_kernel`;
CUDA, fp16/bf16/fp32). See :func:`gathered_attention` for the exact semantics.

Measured with ``benchmarks/op_gathered_attention.py`` on the CPU kernel only (no GPU was available:
the Triton kernel is checked for correctness under ``TRITON_INTERPRET=1``, its speed is unmeasured).
Machine: a shared VM, 2-core AMD EPYC, 23 GiB RAM, torch 2.13.0+cpu with 2 threads, float32, load
average 0.75 at start. LLaVA-1.6-7B decode shapes: 32 heads, D=128, N=2980 cached rows, M=964
selected (30% of the 2880 image rows + 100 text rows); methods interleaved, median of 9 repeats.
ms, and time relative to dense SDPA over all N rows (lower is faster); GB/s = bytes the op must
move (M rows of K and V per kv head, q, idx, out, probs) / time::

    batch   op              dense     gather+SDPA       masked SDPA
      1       6.1 ms 0.85x    7.3 ms    17.2 ms 2.37x      7.2 ms 0.99x
      8      39.0 ms 0.59x   66.2 ms   173.0 ms 2.61x     63.7 ms 0.96x
     32     144.0 ms 0.60x  240.3 ms  1686.3 ms 7.02x    250.8 ms 1.04x
    op GB/s: 5.2 (batch 1), 6.5 (8), 7.1 (32); dense SDPA: 4.4, 3.9, 4.2

A second run right after gave op 0.89x, 0.65x, 0.63x; gather+SDPA varies most between runs (9.5 to
17 ms at batch 1, page faults of its large temporaries on this VM). Slicing before the matmul costs
more than it saves; the op reads only the selected rows, but gathers them at 512-byte granularity,
so on CPU it gains well under the 3x byte ratio. Under heavy contention from other processes it
degrades more than dense SDPA (many more, smaller ops).
"""

from avl.ops.gathered_attention import gathered_attention, gathered_attention_op
from avl.ops.swap_rows import swap_rows_

__all__ = ["gathered_attention", "gathered_attention_op", "swap_rows_"]
