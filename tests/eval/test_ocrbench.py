"""OCRBench substring scoring, per-category / per-group counts, against hand-computed cases."""

from __future__ import annotations

import pytest

from avl.eval.metrics.ocrbench import (
    OCRBENCH_CATEGORIES,
    OCRBENCH_GROUPS,
    ocrbench_match,
    ocrbench_score,
)


def test_category_table() -> None:
    assert len(OCRBENCH_CATEGORIES) == 10
    assert sum(OCRBENCH_CATEGORIES.values()) == 1000
    # Every category in exactly one group; group totals 300 / 200 / 200 / 200 / 100.
    grouped = [c for cats in OCRBENCH_GROUPS.values() for c in cats]
    assert sorted(grouped) == sorted(OCRBENCH_CATEGORIES)
    totals = {g: sum(OCRBENCH_CATEGORIES[c] for c in cats) for g, cats in OCRBENCH_GROUPS.items()}
    assert totals == {
        "Text Recognition": 300,
        "Scene Text-centric VQA": 200,
        "Doc-oriented VQA": 200,
        "Key Information Extraction": 200,
        "Handwritten Mathematical Expression Recognition": 100,
    }


def test_text_rule() -> None:
    # lower-cased substring
    assert ocrbench_match("The word is HELLO.", ["hello"], "IIIT5K") == 1
    assert ocrbench_match("helo", ["hello"], "IIIT5K") == 0
    # answer stripped and lower-cased: " Foo " -> "foo"
    assert ocrbench_match("it says foo bar", " Foo ", "docVQA") == 1
    # any of several answers
    assert ocrbench_match("a bar", ["foo", "bar"], "SROIE") == 1
    # "\n" -> " " on both sides: "line one line two" contains "one line"
    assert ocrbench_match("line one\nline two", ["one line"], "FUNSD") == 1
    # spaces are kept outside HME100k: "ab" is not in "a b"
    assert ocrbench_match("a b", ["ab"], "IIIT5K") == 0


def test_hme_rule_strips_spaces_and_keeps_case() -> None:
    # spaces and newlines removed on both sides: "\frac{a}{b}" in "\frac{a}{b}"
    assert ocrbench_match("\\frac { a }\n{ b }", ["\\frac{a}{b}"], "HME100k") == 1
    # no lower-casing: "\delta" does not match "\Delta"
    assert ocrbench_match("\\Delta x", ["\\delta x"], "HME100k") == 0
    assert ocrbench_match("\\Delta x", ["\\Delta x"], "HME100k") == 1
    # lmms-eval lower-cases the prediction before the HME rule: "\deltax" vs "\Deltax" -> 0
    assert ocrbench_match("\\Delta x", ["\\Delta x"], "HME100k", variant="lmms_eval") == 0
    assert ocrbench_match("\\delta x", ["\\delta x"], "HME100k", variant="lmms_eval") == 1
    # the HME rule applies by source dataset name, case-sensitively
    assert ocrbench_match("A B", ["ab"], "hme100k") == 0


def test_edge_cases() -> None:
    assert ocrbench_match("", ["x"], "IIIT5K") == 0
    # an empty answer is a substring of anything (as in the reference scripts)
    assert ocrbench_match("anything", [""], "IIIT5K") == 1
    assert ocrbench_match("ÄPFEL und birnen", ["äpfel"], "IIIT5K") == 1
    with pytest.raises(ValueError, match="answers is empty"):
        ocrbench_match("x", [], "IIIT5K")
    with pytest.raises(ValueError, match="variant"):
        ocrbench_match("x", ["x"], "IIIT5K", variant="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="answer must be a str"):
        ocrbench_match("x", [1], "IIIT5K")  # type: ignore[list-item]


def test_score_counts() -> None:
    preds = ["hello", "world", "2 + 3", "x", "Total: $5"]
    answers = [["hello"], ["word"], ["2+3"], ["y"], ["$5"]]
    datasets = ["IIIT5K", "svt", "HME100k", "STVQA", "SROIE"]
    qtypes = [
        "Regular Text Recognition",  # hit
        "Regular Text Recognition",  # "word" is not a substring of "world": miss
        "Handwritten Mathematical Expression Recognition",  # "2+3" in "2+3": hit
        "Scene Text-centric VQA",  # miss
        "Key Information Extraction",  # hit
    ]
    result = ocrbench_score(preds, answers, datasets, qtypes)
    assert result.per_category["Regular Text Recognition"] == 1
    assert result.per_category["Handwritten Mathematical Expression Recognition"] == 1
    assert result.per_category["Scene Text-centric VQA"] == 0
    assert result.per_category["Key Information Extraction"] == 1
    assert result.per_category["Doc-oriented VQA"] == 0  # absent categories are present as 0
    assert result.per_group["Text Recognition"] == 1
    assert result.final_score == 3
    assert result.num_questions == 5
    assert result.accuracy == pytest.approx(0.6)


def test_full_benchmark_all_correct_is_1000() -> None:
    qtypes = [c for c, n in OCRBENCH_CATEGORIES.items() for _ in range(n)]
    preds = ["ok"] * 1000
    result = ocrbench_score(preds, [["ok"]] * 1000, ["IIIT5K"] * 1000, qtypes)
    assert result.final_score == 1000
    assert result.per_group["Text Recognition"] == 300
    assert result.accuracy == 1.0


def test_score_errors() -> None:
    with pytest.raises(ValueError, match="unknown question_type 'Foo'"):
        ocrbench_score(["a"], [["a"]], ["IIIT5K"], ["Foo"])
    with pytest.raises(ValueError, match="same length"):
        ocrbench_score(["a", "b"], [["a"]], ["IIIT5K"], ["Doc-oriented VQA"])
    with pytest.raises(ValueError, match="no questions"):
        ocrbench_score([], [], [], [])
