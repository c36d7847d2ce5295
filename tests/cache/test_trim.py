"""The Trim feature policy (Trimmed Llama): validation, its place beside the sequence policy, the feature selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import avl
from avl.cache.policies import FeaturePolicy, Policy
from avl.cache.trim import Trim, kept_counts, select_features


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_keep_outside_zero_one_is_rejected_naming_the_field(keep):
    with pytest.raises(ValueError, match=r"keep=.* is out of range; allowed: a ratio in \(0, 1\]"):
        Trim(keep=keep)


def test_bad_criterion_is_rejected():
    with pytest.raises(ValueError, match="criterion='mean' is not supported"):
        Trim(criterion="mean")


def test_trim_is_a_feature_policy_beside_the_sequence_policy():
    assert isinstance(Trim(), FeaturePolicy) and not isinstance(Trim(), Policy)
    assert Trim().criterion == "head_union"  # the authors' rule is the default
    assert Trim().trims and not Trim(keep=1.0).trims
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="pass it as feature_policy="):
        avl.generate(object(), ids, policy=Trim(keep=0.5))


def test_sum_criterion_keeps_the_top_candidates_by_summed_probability():
    # B=1, H=2, R=2 query rows, N=5 feature rows; row 4 is a padding tile: never kept, however high
    probs = torch.tensor([[[[0.1, 0.5, 0.1, 0.0, 0.3], [0.2, 0.1, 0.1, 0.1, 0.5]],
                           [[0.0, 0.1, 0.6, 0.1, 0.2], [0.1, 0.0, 0.2, 0.2, 0.5]]]])
    candidates = torch.tensor([[True, True, True, True, False]])
    # sums over heads and queries: [0.4, 0.7, 1.0, 0.4, -]; int(0.5 * 4) = 2 rows
    assert select_features(probs, candidates, 0.5, "sum").tolist() == [[False, True, True, False, False]]
    # a tie (rows 0 and 3 at 0.4) goes to the lower index
    assert select_features(probs, candidates, 0.75, "sum").tolist() == [[True, True, True, False, False]]
    assert select_features(probs, candidates, 1.0, "sum").tolist() == candidates.tolist()
    assert select_features(probs, candidates, 0.01, "sum").tolist() == [[False, False, True, False, False]]


def test_head_union_keeps_each_heads_top_rows():
    # per head, summed over queries: head 0 [0.3, 0.6, 0.2, 0.1], head 1 [0.1, 0.1, 0.8, 0.3]
    probs = torch.tensor([[[[0.1, 0.5, 0.1, 0.0], [0.2, 0.1, 0.1, 0.1]],
                           [[0.0, 0.1, 0.6, 0.1], [0.1, 0.0, 0.2, 0.2]]]])
    candidates = torch.ones(1, 4, dtype=torch.bool)
    assert select_features(probs, candidates, 0.25, "head_union").tolist() == [[False, True, True, False]]
    assert select_features(probs, candidates, 0.5, "head_union").tolist() == [[True, True, True, True]]


def test_a_sample_without_image_rows_keeps_nothing():
    probs = torch.rand(2, 2, 3, 4)
    candidates = torch.tensor([[True, True, False, False], [False] * 4])
    assert kept_counts(candidates, 0.5).tolist() == [1, 0]
    assert select_features(probs, candidates, 0.5, "sum").sum(-1).tolist() == [1, 0]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 12), st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_selection_properties(batch, heads, rows, keep, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(batch, heads, 3, rows, generator=g).softmax(-1)
    candidates = torch.rand(batch, rows, generator=g) < 0.7
    n = candidates.sum(-1)
    count = kept_counts(candidates, keep)
    assert count.tolist() == [min(max(int(keep * int(c)), 1), int(c)) for c in n]
    kept_sum = select_features(probs, candidates, keep, "sum")
    kept_union = select_features(probs, candidates, keep, "head_union")
    for kept in (kept_sum, kept_union):
        assert not (kept & ~candidates).any()  # only real rows
    assert kept_sum.sum(-1).tolist() == count.tolist()
    assert ((kept_union.sum(-1) >= count) & (kept_union.sum(-1) <= torch.minimum(n, heads * count))).all()
    assert torch.equal(select_features(probs, candidates, 1.0, "head_union"), candidates)
