"""Fields, errors and whole-cache cases of the kvpress-pinned policies (parity: test_kvpress_parity.py)."""

from __future__ import annotations

import pytest
import torch

from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV
from avl.cache.policies import Policy


@pytest.mark.parametrize("make,match", [
    (lambda: SnapKV(keep=0), r"keep=0 is out of range; allowed: a number in \(0, 1\]"),
    (lambda: SnapKV(keep=1.5), r"keep=1.5 is out of range"),
    (lambda: KNorm(keep=True), r"keep=True is out of range"),
    (lambda: SnapKV(window_size=0), r"window_size=0 is out of range; allowed: an integer >= 1"),
    (lambda: SnapKV(window_size=True), r"window_size=True"),
    (lambda: SnapKV(kernel_size=4), r"kernel_size=4 is out of range; allowed: an odd integer >= 1"),
    (lambda: PyramidKV(beta=0), r"beta=0 is out of range; allowed: an integer >= 1"),
    (lambda: PyramidKV(beta=2.5), r"beta=2.5"),
    (lambda: RandomEviction(seed=-1), r"seed=-1 is out of range; allowed: an integer >= 0"),
    (lambda: RandomEviction(seed=False), r"seed=False"),
    (lambda: AdaKV(alpha_safeguard=1.2), r"alpha_safeguard=1.2 is out of range; allowed: a number in \[0, 1\]"),
    (lambda: AdaKV(alpha_safeguard=True), r"alpha_safeguard=True"),
    (lambda: AdaKV(ObservedAttention()), r"scorer=ObservedAttention.* allowed: SnapKV, KNorm or RandomEviction"),
    (lambda: AdaKV(PyramidKV()), r"scorer=PyramidKV"),
])
def test_bad_fields_are_named_with_the_allowed_range(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_they_are_policies_and_adakv_keeps_its_scorers_share():
    assert all(isinstance(p, Policy) for p in (SnapKV(), PyramidKV(), AdaKV(), KNorm(), ObservedAttention(),
                                               RandomEviction()))
    assert AdaKV(KNorm(keep=0.3)).keep == 0.3


def inputs(batch: int = 1, length: int = 20, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64)
    return q, k, torch.ones(batch, length, dtype=torch.bool)


@pytest.mark.parametrize("policy", [SnapKV(1.0, window_size=64), PyramidKV(1.0), AdaKV(KNorm(1.0)), KNorm(1.0),
                                    ObservedAttention(1.0), RandomEviction(1.0)], ids=repr)
def test_keep_one_keeps_every_prompt_row_without_scoring(policy):
    q, k, valid = inputs()
    valid[0, :3] = False  # left padding stays out
    got = policy.prefill_keep(0, 2, q, k, valid, 8 ** -0.5)  # a 20-row prompt is shorter than SnapKV's window
    assert torch.equal(got, valid[:, None].expand(-1, 2, -1))


def test_snapkv_names_a_prompt_not_longer_than_its_window():
    q, k, valid = inputs(length=20)
    with pytest.raises(ValueError, match="sample 0 has 20 prompt rows; SnapKV needs more than window_size=20"):
        SnapKV(0.5, window_size=20).prefill_keep(0, 2, q, k, valid, 8 ** -0.5)


def test_right_padding_is_rejected():
    q, k, valid = inputs()
    valid[0, -2:] = False
    with pytest.raises(ValueError, match="valid is not left padding"):
        KNorm(0.5).prefill_keep(0, 2, q, k, valid, 8 ** -0.5)


def test_adakv_keeps_the_scorers_total_with_per_head_counts_and_each_heads_safeguard():
    q, k, valid = inputs(length=40)
    k[:, 0] *= 3  # head 0's keys have the large norms, so KNorm's global ranking favours head 1
    keep = AdaKV(KNorm(0.5), alpha_safeguard=0.25).prefill_keep(0, 2, q, k, valid, 8 ** -0.5)
    counts = keep.sum(-1)[0]
    assert int(counts.sum()) == 2 * 20 and counts[0] < counts[1]
    assert int(counts[0]) >= int(20 * 0.25)
    norms = k[0].norm(dim=-1)  # each head's own safeguarded rows are its lowest-norm ones
    assert keep[0, 0, norms[0].argsort()[:5]].all()


def test_mismatched_queries_and_keys_are_named():
    q, k, valid = inputs(length=80)
    with pytest.raises(ValueError, match=r"q \(1, 4, 79, 8\) and k \(1, 2, 80, 8\) do not match"):
        SnapKV(0.5).prefill_keep(0, 2, q[:, :, 1:], k, valid, 8 ** -0.5)
    with pytest.raises(ValueError, match=r"valid has shape \(1, 79\); allowed: \[B, L\] = \[1, 80\]"):
        KNorm(0.5).prefill_keep(0, 2, q, k, valid[:, 1:], 8 ** -0.5)


@pytest.mark.parametrize("policy", [SnapKV(), AdaKV(), KNorm()], ids=repr)
def test_prefill_refuses_them_until_the_cache_calls_prefill_keep(policy):
    with pytest.raises(NotImplementedError, match="does not call prefill_keep yet"):
        policy.check_layers(32)
