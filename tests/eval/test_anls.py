"""ANLS (official DocVQA rule) and lmms-eval 0.2.x's NLS hit rate, against hand-computed cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avl.eval.metrics.anls import (
    anls,
    anls_question,
    levenshtein_distance,
    nls_hit,
    nls_hit_rate,
    normalized_levenshtein_similarity,
)


def _reference_levenshtein(a: str, b: str) -> int:
    # Full (len(a)+1) x (len(b)+1) table, independent of the two-row implementation.
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(
                d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
    return d[len(a)][len(b)]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("", "", 0),
        ("café", "cafe", 1),  # é vs e: one code point
        ("日本語", "日本", 1),
    ],
)
def test_levenshtein_hand(a: str, b: str, expected: int) -> None:
    assert levenshtein_distance(a, b) == expected
    assert levenshtein_distance(b, a) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc ", max_size=8), st.text(alphabet="abc ", max_size=8))
def test_levenshtein_matches_full_table(a: str, b: str) -> None:
    assert levenshtein_distance(a, b) == _reference_levenshtein(a, b)


def test_nls_hand() -> None:
    # "hallo" vs "hello": 1 substitution over max length 5 -> 1 - 1/5
    assert normalized_levenshtein_similarity("hallo", "hello") == pytest.approx(0.8)
    # case and surrounding whitespace are normalised away: distance 0
    assert normalized_levenshtein_similarity("  HeLLo ", "hello") == 1.0
    # inner whitespace runs collapse: "new   york" -> "new york"
    assert normalized_levenshtein_similarity("new   york", "New York") == 1.0
    # both empty: length 0 -> similarity 1
    assert normalized_levenshtein_similarity("", "") == 1.0
    assert normalized_levenshtein_similarity("", "abc") == 0.0


def test_nls_uses_raw_lengths() -> None:
    # Official-script quirk: distance on normalised strings ("ab" vs "abcd" = 2), denominator on
    # raw lengths: max(len("  ab  "), len("abcd")) = 6 -> 1 - 2/6 = 2/3 (not 1 - 2/4 = 0.5).
    assert normalized_levenshtein_similarity("  ab  ", "abcd") == pytest.approx(2 / 3)
    # "ß".upper() == "SS": lengths max(2, 2) = 2, distance("ß", "ss") = 2 -> 0.
    assert normalized_levenshtein_similarity("ß", "ss") == 0.0


def test_anls_question_threshold_and_max() -> None:
    # "abc" vs "abd": 1/3 distance -> 2/3 >= 0.5, kept
    assert anls_question("abc", ["abd"]) == pytest.approx(2 / 3)
    # "abcd" vs "abxy": 2/4 -> exactly 0.5; the rule zeroes only values < 0.5
    assert anls_question("abcd", ["abxy"]) == 0.5
    # "abc" vs "axy": 2/3 distance -> 1/3 < 0.5 -> 0
    assert anls_question("abc", ["axy"]) == 0.0
    # max over ground truths: "new yrk" vs "new york" = 1 - 1/8 = 0.875; vs "nyc" is worse
    assert anls_question("new yrk", ["nyc", "new york"]) == pytest.approx(0.875)
    assert anls_question("New York", ["New York City", "NYC", "new york"]) == 1.0
    # custom threshold: 2/3 similarity zeroed by tau = 0.7
    assert anls_question("abc", ["abd"], threshold=0.7) == 0.0


def test_anls_corpus_mean() -> None:
    # (1 + 2/3 + 0) / 3
    got = anls(["abc", "abc", "abc"], [["abc"], ["abd"], ["xyz"]])
    assert got == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_nls_hit_rounds_partial_matches_up() -> None:
    # lmms-eval 0.2.x: 1 if any single ground truth has NLS >= 0.5.
    assert nls_hit("abcd", ["abxy"]) == 1.0  # ANLS would give 0.5
    assert nls_hit("abc", ["abd"]) == 1.0  # ANLS 2/3
    assert nls_hit("abc", ["axy", "xbz"]) == 0.0  # both 1/3
    assert nls_hit("abc", ["xyz", "abc"]) == 1.0
    preds = ["abcd", "abc", "abc"]
    gts = [["abxy"], ["abd"], ["axy"]]
    assert anls(preds, gts) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert nls_hit_rate(preds, gts) == pytest.approx(2 / 3)


def test_nls_hit_strips_prediction_like_lmms_eval() -> None:
    # "a" + 5 spaces vs "abc": official NLS = 1 - 2/6 = 2/3 (raw length 6) -> ANLS 2/3;
    # lmms-eval strips the generation first: "a" vs "abc" = 1 - 2/3 = 1/3 -> no hit.
    pred = "a     "
    assert anls_question(pred, ["abc"]) == pytest.approx(2 / 3)
    assert nls_hit(pred, ["abc"]) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="abAB", max_size=6),
    st.lists(st.text(alphabet="abAB ", max_size=6), min_size=1, max_size=4),
)
def test_hit_is_anls_nonzero(pred: str, gts: list[str]) -> None:
    assert nls_hit(pred, gts) == float(anls_question(pred, gts) > 0)
    assert nls_hit(pred, gts) >= anls_question(pred, gts)


def test_unicode() -> None:
    assert anls_question("Café", ["café"]) == 1.0
    # "naïve" vs "naive": 1 of 5 -> 0.8
    assert anls_question("naïve", ["naive"]) == pytest.approx(0.8)
    assert anls_question("東京", ["東京都"]) == pytest.approx(1 - 1 / 3)


def test_empty_prediction() -> None:
    assert anls_question("", ["abc"]) == 0.0
    assert anls_question("", [""]) == 1.0
    assert nls_hit("", ["abc"]) == 0.0
    assert nls_hit("   ", [""]) == 1.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="ground_truths is empty"):
        anls_question("abc", [])
    with pytest.raises(ValueError, match="ground_truths is empty"):
        nls_hit("abc", [])
    with pytest.raises(TypeError, match="single str"):
        anls_question("abc", "abc")
    with pytest.raises(ValueError, match="2 predictions but 1"):
        anls(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        nls_hit_rate([], [])
    with pytest.raises(ValueError, match="threshold"):
        anls_question("a", ["a"], threshold=1.5)
    with pytest.raises(TypeError, match="prediction must be a str"):
        anls_question(None, ["a"])  # type: ignore[arg-type]
    assert math.isfinite(anls(["a"], [["a"]]))
