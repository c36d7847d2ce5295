"""VQA answer normalisation and accuracy (VQAv2 official / lmms-eval, TextVQA).

lmms-eval cannot be installed as a test dependency (it pins torch, numpy, datasets...), so the
expected normalised strings below were worked out by hand from the rules of the official
``vqaEval.py`` (processPunctuation / processDigitArticle) and of the EvalAI processor
(word_tokenize first); the reasoning is in the comments.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avl.eval.metrics.vqa import (
    CONTRACTIONS,
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    textvqa_accuracy,
    vqav2_accuracy,
)


def official(text: str) -> str:
    return process_digit_article(process_punctuation(text))


# (input, EvalAI normalize_answer, official punctuation + digit/article)
CASES = [
    # "." not followed by a digit is deleted; "two" -> "2"
    ("Two dogs.", "2 dogs", "2 dogs"),
    # EvalAI word_tokenize: "'s" -> " 's"; the official rules leave "it's" alone
    ("it's", "it 's", "it's"),
    # EvalAI deletes every comma up front; official: a digit-comma-digit anywhere makes every
    # punctuation mark be deleted instead of replaced by a space
    ("1,000", "1000", "1000"),
    ("10,000,000 dollars", "10000000 dollars", "10000000 dollars"),
    # period followed by a digit survives
    ("10.5", "10.5", "10.5"),
    (".5", ".5", ".5"),
    ("3.14.", "3.14", "3.14"),
    ("1.5.2", "1.5.2", "1.5.2"),
    ("2.", "2", "2"),
    # article "a" dropped; possessive split only by EvalAI
    ("a man's hat", "man 's hat", "man's hat"),
    ("it's a dog's life", "it 's dog 's life", "it's dog's life"),
    # "!" touches no space -> replaced by a space, then split/join drops it
    ("yes!", "yes", "yes"),
    ("café!", "café", "café"),
    # contractions table
    ("dont", "don't", "don't"),
    ("whats up", "what's up", "what's up"),
    ("hes", "he's", "he's"),
    ("oclock", "o'clock", "o'clock"),
    ("somebody'd", "somebodyd", "somebodyd"),  # the official table's own oddity
    # "Im" is a table key with a capital, but lookup happens after lower-casing: never hit
    ("Im", "im", "im"),
    ("I'm", "i'm", "i'm"),
    ("He's", "he 's", "he's"),
    # "'" is not a punctuation mark for VQA
    ("dogs'", "dogs'", "dogs'"),
    ("ain't", "ain't", "ain't"),
    # number words up to ten, "none" -> "0"; nothing beyond ten
    ("none", "0", "0"),
    ("Zero", "0", "0"),
    ("ten", "10", "10"),
    ("eleven", "eleven", "eleven"),
    ("twenty", "twenty", "twenty"),
    # articles
    ("the cat", "cat", "cat"),
    ("an apple", "apple", "apple"),
    ("a", "", ""),
    ("the   big   dog", "big dog", "big dog"),
    # "-" with a space next to it (" -") is deleted, else replaced by a space
    ("3 - 4", "3 4", "3 4"),
    ("t-shirt", "t shirt", "t shirt"),
    ("hi-", "hi", "hi"),
    ("black/white", "black white", "black white"),
    ("1/2", "1 2", "1 2"),
    # periods not before digits deleted
    ("Mr. Smith", "mr smith", "mr smith"),
    ("U.S.A.", "usa", "usa"),
    ("a.m.", "am", "am"),
    ("yes.no", "yesno", "yesno"),
    # "?" deleted by EvalAI word_tokenize; official: replaced by a space
    ("what?", "what", "what"),
    # ", " touches a space -> deleted in both
    ("Hello, world", "hello world", "hello world"),
    ("red, white, and blue", "red white and blue", "red white and blue"),
    # "a,b": EvalAI deletes the comma -> "ab"; official replaces it by a space -> "a b", and
    # then "a" is an article -> "b"
    ("a,b", "ab", "b"),
    # official: "1,2" has a digit comma -> "-" deleted too -> "12 and ab"; EvalAI removed the
    # comma first, so "-" becomes a space -> "12 and a b" -> article dropped -> "12 and b"
    ("1,2 and a-b", "12 and b", "12 and ab"),
    # official comma regex needs digit,comma,digit: "1,,000" has none -> commas -> spaces
    ("1,,000", "1000", "1 000"),
    ("@home", "home", "home"),
    ("(5)", "5", "5"),
    ('"quoted"', "quoted", "quoted"),
    ("x = y + z", "x y z", "x y z"),
    ("a_b", "b", "b"),  # "_" -> space, then the article "a" goes
    ("<b>", "b", "b"),
    ("-5", "5", "5"),
    # not punctuation for VQA
    ("2:30", "2:30", "2:30"),
    ("$5", "$5", "$5"),
    ("50%", "50%", "50%"),
    ("it is 5 o'clock", "it is 5 o'clock", "it is 5 o'clock"),
    # whitespace, unicode, empty
    ("multi\nline\tanswer", "multi line answer", "multi line answer"),
    ("  Two\t", "2", "2"),
    ("ÉCOLE", "école", "école"),
    ("", "", ""),
]


@pytest.mark.parametrize(("text", "evalai", "official_out"), CASES)
def test_normalisation(text: str, evalai: str, official_out: str) -> None:
    assert normalize_answer(text) == evalai
    assert official(text) == official_out


def test_period_strip_count_quirk() -> None:
    # The official sub(..., re.UNICODE) passes 32 as `count`: only 32 periods go.
    text = "x." * 40
    expected = "x" * 32 + "x." * 8
    assert process_punctuation(text) == expected
    assert normalize_answer(text) == expected


def test_contractions_table_size() -> None:
    # 120 entries in the official table (and in EvalAI's copy).
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't"


def test_leave_one_out_hand() -> None:
    ten = ["x"] * 10
    # 4+ annotators -> 1; each leave-one-out subset keeps >= 3 matches
    assert leave_one_out_accuracy("yes", ["yes"] * 4 + ten[:6]) == 1.0
    # 3 of 10: leaving out one of the 3 matches leaves 2 (2/3), leaving out one of the 7
    # others leaves 3 (1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert leave_one_out_accuracy("yes", ["yes"] * 3 + ten[:7]) == pytest.approx(0.9)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert leave_one_out_accuracy("yes", ["yes"] * 2 + ten[:8]) == pytest.approx(0.6)
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert leave_one_out_accuracy("yes", ["yes"] + ten[:9]) == pytest.approx(0.3)
    assert leave_one_out_accuracy("yes", ten) == 0.0


def test_fewer_than_ten_answers() -> None:
    # n answers, all matching: each subset has n-1 matches -> min(1, (n-1)/3)
    assert leave_one_out_accuracy("cat", ["cat"]) == 0.0
    assert leave_one_out_accuracy("cat", ["cat"] * 2) == pytest.approx(1 / 3)
    assert leave_one_out_accuracy("cat", ["cat"] * 3) == pytest.approx(2 / 3)
    assert leave_one_out_accuracy("cat", ["cat"] * 4) == 1.0
    # ["cat", "dog", "cat"]: leave cat -> 1 match (1/3), leave dog -> 2 (2/3), leave cat -> 1/3
    assert vqav2_accuracy("cat", ["cat", "dog", "cat"]) == pytest.approx(4 / 9)


def test_vqav2_official_vs_lmms_eval() -> None:
    # Unanimous ground truths: official compares the stripped strings as they are.
    assert vqav2_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqav2_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqav2_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqav2_accuracy("Yes.", ["yes"] * 10, variant="lmms_eval") == 1.0
    assert vqav2_accuracy("Two", ["2"] * 10) == 0.0
    assert vqav2_accuracy("Two", ["2"] * 10, variant="lmms_eval") == 1.0
    # Differing ground truths: both sides normalised, "three" -> "3", "Two" -> "2".
    gts = ["2"] * 3 + ["three"] * 7
    # 7 matches: every leave-one-out subset keeps >= 6 -> 1
    assert vqav2_accuracy("3", gts) == 1.0
    # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9, in both variants
    assert vqav2_accuracy("Two", gts) == pytest.approx(0.9)
    assert vqav2_accuracy("Two", gts, variant="lmms_eval") == pytest.approx(0.9)
    # "'s": lmms-eval splits it in the prediction only.
    gts = ["man's hat"] * 5 + ["hat"] * 5
    assert vqav2_accuracy("man's hat", gts) == 1.0
    assert vqav2_accuracy("man's hat", gts, variant="lmms_eval") == 0.0
    with pytest.raises(ValueError, match="variant"):
        vqav2_accuracy("x", ["x"], variant="other")  # type: ignore[arg-type]


def test_textvqa() -> None:
    # Everything goes through the EvalAI processor: "Coca-Cola" -> "coca cola"
    gts = ["coca cola"] * 4 + ["Coca-Cola"] * 3 + ["pepsi"] * 3
    assert textvqa_accuracy("COCA-COLA.", gts) == 1.0
    # Unanimous "man's" still matches: both sides become "man 's"
    assert textvqa_accuracy("Man's", ["man's"] * 10) == 1.0
    assert vqav2_accuracy("Man's", ["man's"] * 10, variant="lmms_eval") == 0.0
    # 1 of 10 -> 0.3
    assert textvqa_accuracy("1,000", ["1000"] + ["10"] * 9) == pytest.approx(0.3)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aAb .,-'s!?0123", max_size=12))
def test_normalize_answer_is_idempotent_enough(text: str) -> None:
    # Invariants of the EvalAI processor: lower-case, no "," or "?" and single spaces.
    out = normalize_answer(text)
    assert out == out.lower()
    assert "," not in out and "?" not in out
    assert "  " not in out and out == out.strip()


def test_edge_cases() -> None:
    assert vqav2_accuracy("", [""] * 10) == 1.0
    assert textvqa_accuracy("", ["a"] * 10) == 1.0  # "a" is an article: normalises to ""
    assert vqav2_accuracy("", ["yes"] * 10) == 0.0
    with pytest.raises(ValueError, match="ground_truths is empty"):
        vqav2_accuracy("yes", [])
    with pytest.raises(ValueError, match="ground_truths is empty"):
        textvqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="single str"):
        vqav2_accuracy("yes", "yes")
    assert normalize_answer("Ñandú") == "ñandú"
