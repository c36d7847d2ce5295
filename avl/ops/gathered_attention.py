"""Registration of ``avl::gathered_attention`` and the validating Python entry point.

The op is a ``torch.library.custom_op``: one opaque node for ``torch.compile`` (the fake
implementation gives output shapes and dtypes), a plain-torch kernel for CPU and any other device
(:mod:`avl.ops.reference`), and a Triton kernel for CUDA (:mod:`avl.ops.triton_kernel`, imported on
first use so that the package imports without ``triton``). float64 on CUDA, and CUDA without
``triton`` installed, fall back to the plain-torch kernel.
"""

from __future__ import annotations

import math
import warnings

import torch

from avl.ops.reference import accumulation_dtype, gathered_attention_torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.library.custom_op("avl::gathered_attention", mutates_args=())
def gathered_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``avl::gathered_attention(q, k, v, idx, scale) -> (out, probs)``; no validation, see :func:`gathered_attention`."""
    return gathered_attention_torch(q, k, v, idx, scale)


@gathered_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, _, D = q.shape
    M = idx.shape[2]
    out = q.new_empty(B, Hq, 1, D)  # [B, Hq, 1, D]
    probs = q.new_empty(B, Hq, M, dtype=accumulation_dtype(q.dtype))  # [B, Hq, M]
    return out, probs


@gathered_attention_op.register_kernel("cuda")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dtype == torch.float64:  # Triton kernel is fp32-accumulating only
        return gathered_attention_torch(q, k, v, idx, scale)
    try:
        from avl.ops.triton_kernel import gathered_attention_triton
    except ImportError:
        warnings.warn("avl::gathered_attention: triton is not installed, CUDA inputs use the slower "
                      "plain-torch kernel (pip install 'avl[triton]')", RuntimeWarning, stacklevel=2)
        return gathered_attention_torch(q, k, v, idx, scale)
    return gathered_attention_triton(q, k, v, idx, scale)


def _check_tensor(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gathered_attention: {name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"gathered_attention: {name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")
    return x


def _validate_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
    """Shape, dtype and device checks; they read no tensor data, so they are fine under compile."""
    _check_tensor("q", q, 4, "[B, Hq, 1, D]")
    _check_tensor("k", k, 4, "[B, Hkv, N, D]")
    _check_tensor("v", v, 4, "[B, Hkv, N, D]")
    _check_tensor("idx", idx, 3, "[B, Hkv, M]")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gathered_attention: q has dtype {q.dtype}, expected one of {list(_FLOAT_DTYPES)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"gathered_attention: {name} has dtype {x.dtype}, expected q's dtype {q.dtype}")
    if idx.dtype != torch.int32:
        raise TypeError(f"gathered_attention: idx has dtype {idx.dtype}, expected torch.int32")
    for name, x in (("k", k), ("v", v), ("idx", idx)):
        if x.device != q.device:
            raise ValueError(f"gathered_attention: {name} is on {x.device}, expected q's device {q.device}")
    if T != 1:
        raise ValueError(f"gathered_attention: q must hold one query token, shape [B, Hq, 1, D], got {tuple(q.shape)}")
    if D < 1 or Hq < 1 or Hkv < 1:
        raise ValueError(f"gathered_attention: Hq, Hkv and D must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"gathered_attention: v has shape {tuple(v.shape)}, expected k's shape {tuple(k.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"gathered_attention: k has shape {tuple(k.shape)}, expected [B={B}, Hkv, N, D={D}] "
                         f"to match q {tuple(q.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"gathered_attention: query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
    if idx.shape[0] != B or idx.shape[1] != Hkv:
        raise ValueError(f"gathered_attention: idx has shape {tuple(idx.shape)}, expected [B={B}, Hkv={Hkv}, M]")


def _validate_indices(idx: torch.Tensor, n_rows: int) -> None:
    """Data-dependent range check of ``idx`` (one device sync); never called while compiling."""
    if idx.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(idx))
    if lo < -1 or hi >= n_rows:
        bad = lo if lo < -1 else hi
        raise ValueError(f"gathered_attention: idx holds {bad}, allowed range is [-1, {n_rows - 1}] "
                         f"(-1 = skip, k/v have N={n_rows} rows)")


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float | None = None,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new query token over the cache rows listed in ``idx``.

    ``out[b, h] = sum_j probs[b, h, j] * v[b, g, idx[b, g, j]]`` with
    ``probs[b, h] = softmax_j(scale * q[b, h] . k[b, g, idx[b, g, j]])`` and ``g = h // (Hq // Hkv)``,
    computed without materialising the gathered K/V.

    Args:
        q: ``[B, Hq, 1, D]`` query of the new token; float16, bfloat16, float32 or float64.
        k, v: ``[B, Hkv, N, D]`` cache, same dtype and device as ``q``; ``Hq`` a multiple of ``Hkv``.
        idx: ``[B, Hkv, M]`` torch.int32 rows of the cache to attend to, per (batch, kv head).
            ``-1`` entries are skipped (probability 0). Duplicated entries are allowed and each one
            counts as a separate key, as if the row had been gathered twice (the project's policies
            never produce duplicates).
        scale: logit scale, default ``1 / sqrt(D)``.
        validate: check that every ``idx`` entry lies in ``[-1, N)``. This reads ``idx`` (a device
            sync) and is skipped automatically inside ``torch.compile``; shape, dtype and device
            checks always run. Unchecked out-of-range entries are skipped like ``-1``.

    Returns:
        ``(out, probs)``: ``out [B, Hq, 1, D]`` in ``q``'s dtype and ``probs [B, Hq, M]`` in float32
        (float64 for float64 inputs), in ``idx`` order, 0 at skipped entries. Softmax accumulates in
        fp32 (fp64 for fp64). A (batch, kv head) whose entries are all skipped gives ``out = 0`` and
        ``probs = 0`` for its query heads.

    Raises:
        TypeError: a non-tensor argument, unsupported or mismatched dtypes, ``idx`` not int32.
        ValueError: bad shapes, mismatched devices, out-of-range ``idx`` entries, non-finite scale.

    Inference only: the op has no autograd formula. Under ``torch.compile`` the op is one opaque node
    and ``scale`` is specialised (keep it constant across steps, or each new value recompiles).
    In an eager decode loop pass ``validate=False`` to avoid the per-call sync.
    """
    _validate_static(q, k, v, idx)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"gathered_attention: scale must be a Python float or None, got {type(scale).__name__}")
    if not torch.compiler.is_compiling():  # a traced scale may be symbolic: no Python float math on it
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"gathered_attention: scale must be finite, got {scale}")
        if validate:
            _validate_indices(idx, k.shape[2])
    return gathered_attention_op(q, k, v, idx, scale)
