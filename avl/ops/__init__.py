"""Gathered attention: one new query token attends over a listed subset of cached rows.

``avl.ops.gathered_attention(q, k, v, idx, scale)`` validates its inputs and calls the custom op
``torch.ops.avl.gathered_attention`` (registered in :mod:`avl.ops.gathered_attention`), which
``torch.compile(fullgraph=True)`` keeps as one opaque node. Kernels: plain torch
(:mod:`avl.ops.reference`; CPU, and float64 anywhere) and Triton (:mod:`avl.ops.triton_kernel`;
CUDA, fp16/bf16/fp32). See :func:`gathered_attention` for the exact semantics.

Measured with ``benchmarks/op_gathered_attention.py`` on the CPU kernel (AMD EPYC, 2 cores,
float32, torch 2.13.0, 2026-11-21), LLaVA-1.6-7B decode shapes: 32 heads, D=128, N=2980 cached
rows, M=964 selected (30% of the 2880 image rows + 100 text rows). Time relative to dense SDPA
over all N rows (lower is faster):

    batch   op      gather+SDPA   masked SDPA
      1     1.28x   2.19x         1.02x
      8     0.59x   2.96x         1.05x
     32     0.65x   2.47x         1.00x

Slicing before the matmul costs more than it saves (as the A-VL paper notes); the op reads only
the selected rows and beats dense from batch 8 on, where the cache rather than fixed overhead
dominates. No GPU was available for this measurement: the Triton kernel is checked for
correctness under ``TRITON_INTERPRET=1`` only; its speed is unmeasured.
"""

from avl.ops.gathered_attention import gathered_attention, gathered_attention_op

__all__ = ["gathered_attention", "gathered_attention_op"]
