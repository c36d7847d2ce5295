"""Tests of avl.ops.gathered_attention: reference comparison, opcheck, compile, Triton (interpreter), errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import avl.ops
from avl.ops import gathered_attention, gathered_attention_op
from avl.ops.reference import gathered_attention_torch

REPO = Path(__file__).resolve().parents[2]

# (out atol, out rtol, probs atol) against a float64 reference computed from the same rounded inputs.
TOL = {
    torch.float64: (1e-12, 1e-10, 1e-12),
    torch.float32: (2e-6, 1e-5, 1e-6),
    torch.float16: (2e-3, 1e-2, 1e-6),
    torch.bfloat16: (1.6e-2, 2e-2, 1e-6),
}


def dense_reference(q, k, v, idx, scale):
    """Plain masked attention in float64 over all N rows; rows not listed in idx get -inf.

    Only valid for idx without duplicates. Returns (out [B, Hq, 1, D], probs [B, Hq, M]) in float64.
    """
    B, Hq, _, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kd = k.double().repeat_interleave(G, dim=1)  # [B, Hq, N, D]
    vd = v.double().repeat_interleave(G, dim=1)  # [B, Hq, N, D]
    rows = idx.long().repeat_interleave(G, dim=1)  # [B, Hq, M]
    scores = (q.double() @ kd.transpose(-1, -2)).squeeze(2) * scale  # [B, Hq, N]
    listed = torch.zeros(B, Hq, N + 1, dtype=torch.bool)  # column N collects the -1 entries
    listed.scatter_(2, torch.where(rows >= 0, rows, N), True)
    scores = scores.masked_fill(~listed[..., :N], -math.inf)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row set with nothing listed -> all 0
    out = p.unsqueeze(2) @ vd  # [B, Hq, 1, D]
    probs = p.gather(2, rows.clamp(min=0)) * (rows >= 0)  # [B, Hq, M]
    return out, probs


def gather_reference(q, k, v, idx, scale):
    """Slice-then-attend in float64: gather the listed rows (duplicates included), softmax over M."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    rows = idx.long().repeat_interleave(G, dim=1)  # [B, Hq, M]
    b = torch.arange(B).view(B, 1, 1)
    h = (torch.arange(Hq) // G).view(1, Hq, 1)
    kg, vg = k.double()[b, h, rows.clamp(min=0)], v.double()[b, h, rows.clamp(min=0)]  # [B, Hq, M, D]
    scores = (q.double() @ kg.transpose(-1, -2)).squeeze(2) * scale  # [B, Hq, M]
    p = torch.softmax(scores.masked_fill(rows < 0, -math.inf), dim=-1).nan_to_num(0.0)
    out = p.unsqueeze(2) @ vg.masked_fill((rows < 0).unsqueeze(-1), 0.0)  # [B, Hq, 1, D]
    return out, p


def make_case(seed, B, Hq, Hkv, N, M, D, dtype, pattern="none", duplicates=False):
    """Random inputs; pattern: "none" | "some" (about 30% -1) | "all" (one row set all -1, plus some)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    if duplicates:
        idx = torch.randint(0, N, (B, Hkv, M), generator=g)
    else:
        idx = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B * Hkv)]).view(B, Hkv, M)
    if pattern in ("some", "all"):
        idx = idx.masked_fill(torch.rand(B, Hkv, M, generator=g) < 0.3, -1)
    if pattern == "all":
        idx[torch.randint(0, B, (), generator=g), torch.randint(0, Hkv, (), generator=g)] = -1
    return q, k, v, idx.to(torch.int32)


def assert_close(out, probs, ref_out, ref_probs, dtype, out_atol=None):
    atol, rtol, patol = TOL[dtype]
    assert out.dtype == dtype
    assert probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref_out, atol=out_atol or atol, rtol=rtol)
    torch.testing.assert_close(probs.double(), ref_probs, atol=patol, rtol=1e-4 if dtype != torch.float64 else 1e-10)


cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "B": st.integers(1, 3),
    "Hkv": st.integers(1, 3),
    "ratio": st.sampled_from([1, 4, 8]),
    "N": st.integers(1, 80),
    "M": st.integers(1, 80),
    "D": st.sampled_from([64, 128]),
    "dtype": st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    "pattern": st.sampled_from(["none", "some", "all"]),
    "chunk_rows": st.integers(1, 40),
})


@settings(max_examples=40, deadline=None)
@given(c=cases)
def test_matches_dense_reference(c):
    M = min(c["M"], c["N"])  # no duplicates: at most N entries
    q, k, v, idx = make_case(c["seed"], c["B"], c["Hkv"] * c["ratio"], c["Hkv"], c["N"], M, c["D"], c["dtype"],
                             c["pattern"])
    scale = 1 / math.sqrt(c["D"])
    ref_out, ref_probs = dense_reference(q, k, v, idx, scale)
    out, probs = gathered_attention(q, k, v, idx)  # default scale = 1/sqrt(D)
    assert_close(out, probs, ref_out, ref_probs, c["dtype"])
    # The kernel directly, with a chunking that splits the index list.
    out, probs = gathered_attention_torch(q, k, v, idx, scale, chunk_rows=c["chunk_rows"])
    assert_close(out, probs, ref_out, ref_probs, c["dtype"])


@settings(max_examples=25, deadline=None)
@given(c=cases)
def test_duplicates_count_as_separate_keys(c):
    """Duplicated idx entries behave like gathering the row twice (documented semantics)."""
    q, k, v, idx = make_case(c["seed"], c["B"], c["Hkv"] * c["ratio"], c["Hkv"], c["N"], c["M"], c["D"],
                             c["dtype"], c["pattern"], duplicates=True)
    out, probs = gathered_attention(q, k, v, idx, 0.2)
    assert_close(out, probs, *gather_reference(q, k, v, idx, 0.2), c["dtype"])


def cache_like_index(g, B, Hkv, N, pinned, core, width):
    """An index list shaped like a decode step's: pinned rows 0..pinned-1 (some samples shorter: -1),
    a scattered core set, then an evictable window from N - width with holes."""
    start = N - width
    cols = []
    short = torch.randint(0, pinned + 1, (B,), generator=g)  # sample b has its first `short` pinned rows missing
    system = torch.arange(pinned).expand(B, pinned).masked_fill(torch.arange(pinned) < short[:, None], -1)
    cols.append(system[:, None].expand(B, Hkv, pinned))
    scattered = torch.stack([torch.randperm(start - pinned, generator=g)[:core] + pinned for _ in range(B)])
    cols.append(scattered[:, None].expand(B, Hkv, core))
    window = (torch.arange(width) + start).expand(B, Hkv, width)
    cols.append(window.masked_fill(torch.rand(B, Hkv, width, generator=g) < 0.3, -1))
    return torch.cat(cols, dim=2).to(torch.int32)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), Hkv=st.integers(1, 2), ratio=st.sampled_from([1, 4]),
       pinned=st.integers(0, 40), core=st.integers(0, 20), width=st.integers(1, 40),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), garbage=st.booleans())
def test_runs_of_consecutive_rows_read_in_place_match_the_reference(seed, B, Hkv, ratio, pinned, core, width, dtype,
                                                                   garbage):
    """Index lists as the cache builds them: the contiguous runs take the dense path, and a skipped row
    holding NaN / inf (an unused slot) changes nothing."""
    from avl.ops.reference import _column_runs

    g = torch.Generator().manual_seed(seed)
    N = pinned + core + 10 + width
    Hq, D = Hkv * ratio, 64
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, N, D, generator=g).to(dtype) for _ in range(2))
    idx = cache_like_index(g, B, Hkv, N, pinned, core, width)
    listed = torch.zeros(B, Hkv, N + 1, dtype=torch.bool)  # column N collects the -1 entries
    listed = listed.scatter_(2, torch.where(idx >= 0, idx.long(), N), True)[..., :N]
    clean_k, clean_v = k.clone(), v.clone()
    if garbage:  # every row nobody attends holds NaN / inf
        k.masked_fill_(~listed[..., None], float("nan"))
        v.masked_fill_(~listed[..., None], float("inf"))
    scale = D**-0.5
    ref_out, ref_probs = dense_reference(q, clean_k, clean_v, idx, scale)
    out, probs = gathered_attention_torch(q, k, v, idx, scale)
    assert_close(out, probs, ref_out, ref_probs, dtype)
    valid = (idx >= 0).long()
    runs = _column_runs(idx.long(), valid.bool(), N)
    assert sum(r.stop - r.start for r in runs) == idx.shape[2]
    first_listed = int((idx[..., -width:] >= 0).any(dim=(0, 1)).long().argmax())
    if width - first_listed >= 16:  # the evictable window (from its first listed column) is read in place
        last = runs[-1]
        assert last.base >= 0 and last.stop == idx.shape[2] and last.start <= idx.shape[2] - width + first_listed


def test_all_skipped_gives_zeros_and_garbage_rows_are_ignored():
    q, k, v, idx = make_case(0, 2, 8, 2, 30, 12, 64, torch.float32)
    idx = (idx % 29 + 1).to(torch.int32)  # never row 0
    idx[0, 1] = -1  # kv head 1 of batch 0: nothing listed -> query heads 4..7 give zeros
    idx[1, 0, ::2] = -1
    k[:, :, 0] = float("nan")  # an unused slot holding garbage must not leak through -1 entries
    v[:, :, 0] = float("inf")
    out, probs = gathered_attention(q, k, v, idx)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert (out[0, 4:] == 0).all() and (probs[0, 4:] == 0).all()
    assert (probs[1, :4, ::2] == 0).all()
    torch.testing.assert_close(probs.sum(-1)[0, :4], torch.ones(4))
    ref_out, ref_probs = dense_reference(q, k.nan_to_num(0.0), v.nan_to_num(0.0, posinf=0.0), idx, 0.125)
    assert_close(out, probs, ref_out, ref_probs, torch.float32)


def test_empty_index_list_and_non_contiguous_inputs():
    q, k, v, _ = make_case(1, 2, 4, 2, 10, 0, 64, torch.float32)
    out, probs = gathered_attention(q, k, v, torch.empty(2, 2, 0, dtype=torch.int32))
    assert out.shape == (2, 4, 1, 64) and probs.shape == (2, 4, 0) and (out == 0).all()
    # q as a transposed view, k/v as a slice of a larger cache buffer, idx as a slice
    q, k, v, idx = make_case(2, 2, 8, 2, 40, 20, 64, torch.float32, "some")
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_big = torch.zeros(2, 2, 50, 64).index_copy_(2, torch.arange(40), k)[:, :, :40]
    v_big = torch.zeros(2, 2, 50, 64).index_copy_(2, torch.arange(40), v)[:, :, :40]
    idx_strided = torch.stack([idx, torch.full_like(idx, 7)], dim=-1).view(2, 2, 40)[:, :, ::2]  # == idx
    out, probs = gathered_attention(q_t, k_big, v_big, idx_strided)
    assert_close(out, probs, *dense_reference(q, k, v, idx, 0.125), torch.float32)


OPCHECK_CASES = [
    (3, 1, 4, 4, 16, 8, 64, torch.float32, "none"),
    (4, 2, 8, 2, 24, 16, 64, torch.float32, "some"),  # GQA 4
    (5, 2, 8, 1, 24, 20, 128, torch.float64, "all"),  # GQA 8, an all -1 row set
    (6, 1, 4, 1, 12, 12, 64, torch.float16, "some"),
    (7, 2, 2, 2, 12, 5, 64, torch.bfloat16, "none"),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[7]}-{c[8]}".replace("torch.", ""))
def test_opcheck(case):
    q, k, v, idx = make_case(*case)
    torch.library.opcheck(gathered_attention_op, (q, k, v, idx, 0.125))


def test_op_is_one_opaque_node_without_data_dependent_checks():
    """Under dynamo the wrapper keeps only static checks; the graph holds exactly one op call."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(q, k, v, idx):
        out, probs = avl.ops.gathered_attention(q, k, v, idx, 0.125)
        return out + 1, probs.sum(-1)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    q, k, v, idx = make_case(8, 2, 8, 2, 30, 12, 64, torch.float32, "some")
    got = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, idx)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.avl.gathered_attention.default) == 1
    names = [getattr(t, "__name__", str(t)) for t in targets]
    assert not [n for n in names if "aminmax" in n or n in ("item", "_local_scalar_dense")], names
    torch.testing.assert_close(got, step(q, k, v, idx))

    # A scale passed in as an argument is traced symbolically; it must still compile without breaks.
    def step_scale(q, k, v, idx, scale):
        return avl.ops.gathered_attention(q, k, v, idx, scale)

    compiled = torch.compile(step_scale, backend=backend, fullgraph=True)
    for scale in (0.1, 0.2):
        torch.testing.assert_close(compiled(q, k, v, idx, scale), step_scale(q, k, v, idx, scale))
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inductor_fullgraph_matches_eager(dtype):
    def step(q, k, v, idx):
        out, probs = avl.ops.gathered_attention(q, k, v, idx, 1 / 8)
        return out * 2.0, probs.amax(-1)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    q, k, v, idx = make_case(9, 2, 8, 2, 40, 24, 64, dtype, "all")
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):  # second call reuses the graph
        got = compiled(q, k, v, idx)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want = step(q, k, v, idx)
    exact = dict(atol=0.0, rtol=0.0) if dtype == torch.float64 else {}
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **exact)


# ---- bad input -------------------------------------------------------------------------------

def _good():
    return make_case(10, 2, 8, 2, 16, 6, 64, torch.float32)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, k, v, i: (q[:, :, 0], k, v, i), ValueError, r"q must have 4 dims .*\(2, 8, 64\)"),
    (lambda q, k, v, i: (q, k, v, i[0]), ValueError, r"idx must have 3 dims"),
    (lambda q, k, v, i: (q.expand(2, 8, 2, 64), k, v, i), ValueError, r"one query token.*\(2, 8, 2, 64\)"),
    (lambda q, k, v, i: (q, k, v[:, :, :8], i), ValueError, r"v has shape \(2, 2, 8, 64\), expected k's shape"),
    (lambda q, k, v, i: (q, k[..., :32], v[..., :32], i), ValueError, r"k has shape .*D=64"),
    (lambda q, k, v, i: (q, k[:1], v[:1], i), ValueError, r"k has shape \(1, 2, 16, 64\), expected \[B=2"),
    (lambda q, k, v, i: (q[:, :7], k, v, i), ValueError, r"Hq=7 must be a multiple of kv heads Hkv=2"),
    (lambda q, k, v, i: (q, k, v, i[:, :1]), ValueError, r"idx has shape \(2, 1, 6\), expected \[B=2, Hkv=2, M\]"),
    (lambda q, k, v, i: (q, k, v, i.long()), TypeError, r"idx has dtype torch.int64, expected torch.int32"),
    (lambda q, k, v, i: (q, k.double(), v, i), TypeError, r"k has dtype torch.float64, expected q's dtype"),
    (lambda q, k, v, i: (q.int(), k.int(), v.int(), i), TypeError, r"q has dtype torch.int32"),
    (lambda q, k, v, i: (q, k, v.to("meta"), i), ValueError, r"v is on meta, expected q's device cpu"),
    (lambda q, k, v, i: (q, k, v, i.to("meta")), ValueError, r"idx is on meta"),
    (lambda q, k, v, i: (q.numpy(), k, v, i), TypeError, r"q must be a torch.Tensor .*ndarray"),
    (lambda q, k, v, i: (q, k, v, i.index_fill(2, torch.tensor([3]), 16)), ValueError,
     r"idx holds 16, allowed range is \[-1, 15\]"),
    (lambda q, k, v, i: (q, k, v, i.index_fill(2, torch.tensor([0]), -2)), ValueError,
     r"idx holds -2, allowed range is \[-1, 15\]"),
])
def test_bad_input_raises_clear_error(mutate, exc, match):
    with pytest.raises(exc, match=match):
        gathered_attention(*mutate(*_good()))


def test_bad_scale_and_validate_flag():
    q, k, v, idx = _good()
    with pytest.raises(TypeError, match="scale must be a Python float"):
        gathered_attention(q, k, v, idx, torch.tensor(0.1))
    with pytest.raises(ValueError, match="scale must be finite, got nan"):
        gathered_attention(q, k, v, idx, float("nan"))
    # validate=False skips the range check; out-of-range entries are then skipped like -1.
    bad = idx.clone()
    bad[0, 0, 0] = 99
    out, probs = gathered_attention(q, k, v, bad, validate=False)
    skipped = bad.masked_fill(bad >= 16, -1)
    torch.testing.assert_close(out, gathered_attention(q, k, v, skipped)[0])
    assert probs[0, 0, 0] == 0


def test_package_imports_and_runs_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch, avl.ops
        q = torch.randn(1, 2, 1, 8); k = torch.randn(1, 1, 5, 8)
        out, probs = avl.ops.gathered_attention(q, k, k, torch.tensor([[[0, 3, -1]]], dtype=torch.int32))
        assert probs.shape == (1, 2, 3) and "avl.ops.triton_kernel" not in sys.modules
        print("ok")
    """)
    res = _run_python(code, {})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ---- Triton kernel under the interpreter (CPU) ---------------------------------------------------

def _run_python(code: str, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


# (seed, B, Hq, Hkv, N, M, D, dtype, pattern, duplicates, num_splits). GQA 1-3 use the exact fp32
# broadcast path, GQA >= 4 the tl.dot path. bfloat16 runs only on the broadcast path: the triton
# 3.9 interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits.
TRITON_CASES = [
    (20, 2, 4, 4, 40, 24, 64, "float32", "some", False, 2),
    (21, 2, 8, 2, 50, 40, 64, "float32", "all", False, 3),
    (22, 1, 8, 1, 100, 70, 128, "float32", "some", False, None),
    (23, 2, 6, 2, 30, 30, 64, "float32", "none", False, 1),  # GQA 3 (head block padded to 4)
    (24, 1, 16, 1, 40, 33, 64, "float32", "some", False, 2),  # GQA 16
    (25, 1, 4, 1, 20, 19, 8, "float32", "none", False, 2),  # D = 8, padded to the 16-wide dot tile
    (26, 2, 2, 2, 40, 33, 64, "float16", "all", False, 2),
    (27, 1, 8, 2, 40, 33, 128, "float16", "some", False, 2),
    (28, 1, 4, 2, 40, 33, 64, "bfloat16", "some", False, 2),
    (29, 1, 4, 1, 10, 20, 64, "float32", "some", True, 2),  # duplicates
    (30, 1, 8, 2, 20, 12, 64, "float32", "all", False, 1),
]

TRITON_SCRIPT = """
import torch
from avl.ops.triton_kernel import gathered_attention_triton
cases, results = {cases!r}, []
for (seed, B, Hq, Hkv, N, M, D, dtype, pattern, dup, splits) in cases:
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dt)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dt)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dt)
    if dup:
        idx = torch.randint(0, N, (B, Hkv, M), generator=g)
    else:
        idx = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B * Hkv)]).view(B, Hkv, M)
    if pattern in ("some", "all"):
        idx = idx.masked_fill(torch.rand(B, Hkv, M, generator=g) < 0.3, -1)
    if pattern == "all":
        idx[0, Hkv - 1] = -1
    idx = idx.to(torch.int32)
    # strided inputs: q as a transposed view, k/v as a slice of a longer cache buffer
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.cat([k, torch.full_like(k[:, :, :3], float("nan"))], dim=2)[:, :, :N]
    v = torch.cat([v, torch.full_like(v[:, :, :3], float("nan"))], dim=2)[:, :, :N]
    out, probs = gathered_attention_triton(q, k, v, idx, D ** -0.5, num_splits=splits)
    results.append(dict(q=q, k=k, v=v, idx=idx, out=out, probs=probs))
try:
    gathered_attention_triton(q.double(), k.double(), v.double(), idx, 0.1)
except TypeError as e:
    f64_error = str(e)
torch.save(dict(results=results, f64_error=f64_error), {path!r})
"""


def test_triton_kernel_under_interpreter(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "triton_results.pt"
    code = TRITON_SCRIPT.format(cases=TRITON_CASES, path=str(path))
    res = _run_python(code, {"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    saved = torch.load(path)
    assert "dtype torch.float64 is not supported" in saved["f64_error"]
    for case, r in zip(TRITON_CASES, saved["results"]):
        dtype, dup = getattr(torch, case[7]), case[9]
        reference = gather_reference if dup else dense_reference
        ref_out, ref_probs = reference(r["q"], r["k"], r["v"], r["idx"], case[6] ** -0.5)
        # fp16 on the dot path rounds the softmax weights to fp16 before p @ v (FlashAttention-style)
        out_atol = 5e-3 if dtype == torch.float16 else None
        assert_close(r["out"], r["probs"], ref_out, ref_probs, dtype, out_atol=out_atol)
        empty = (r["idx"] < 0).all(-1).repeat_interleave(case[2] // case[3], dim=1)  # [B, Hq]
        assert (r["out"][empty] == 0).all() and (r["probs"][empty] == 0).all()
