"""PTB tokenisation: the pure-Python approximation on hand cases, and, where Java and
pycocoevalcap are installed, the exact mode against pycocoevalcap's ``PTBTokenizer`` and the
approximation against the exact mode.

The expected strings of the hand cases are the Stanford CoreNLP 3.4.1 PTBTokenizer's output
(``-preserveLines -lowerCase``) with pycocoevalcap's punctuation list removed.
"""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avl.eval.metrics.cider import cider_d
from avl.eval.metrics.ptb_tokenize import (
    PUNCTUATIONS,
    PTBTokenizerUnavailableError,
    ptb_tokenize,
    ptb_tokenize_java,
    tokenize_captions,
)

HAND_CASES = [
    # lower-case, "," and "." removed, possessive clitic split
    ("A man's hat, on the table.", "a man 's hat on the table"),
    # n't split (ca n't, do n't), ";" and "!" removed
    ("Two dogs don't play; they can't!", "two dogs do n't play they ca n't"),
    # brackets become -lrb-/-rrb- in lower case, which pycocoevalcap's list (upper case) keeps
    ("A cat (black) on a mat.", "a cat -lrb- black -rrb- on a mat"),
    ("a [b] {c}", "a -lsb- b -rsb- -lcb- c -rcb-"),
    # quotes: `` and '' removed; numbers with , . : kept whole; % and $ split off and kept
    ('"Quoted" text: 10.5% of $3.50, 1,000 at 3:30', "quoted text 10.5 % of $ 3.50 1,000 at 3:30"),
    # abbreviations keep their period; the sentence-final period goes
    ("Mr. Smith in the U.S. at 5 p.m. today.", "mr. smith in the u.s. at 5 p.m. today"),
    ("He said no.", "he said no"),
    ("No. 5", "no. 5"),
    # hyphenated words whole; "--" and "-" removed
    ("a black-and-white photo -- really - ok", "a black-and-white photo really ok"),
    # more clitics and special splits
    (
        "I'm sure you'll see we've they'd cannot gonna",
        "i 'm sure you 'll see we 've they 'd can not gon na",
    ),
    ("the dogs' toys", "the dogs toys"),
    ("it’s “smart” — ok…", "it 's smart ok"),
    # runs of ! or ? are one token, not in the list, so they stay
    ("wow!! what?!", "wow !! what ?!"),
    ("a&b", "a & b"),
    ("", ""),
    ("   ", ""),
]


@pytest.mark.parametrize(("text", "expected"), HAND_CASES)
def test_approximation_hand_cases(text: str, expected: str) -> None:
    assert ptb_tokenize(text) == expected


def test_punctuation_list_is_pycocoevalcaps() -> None:
    assert PUNCTUATIONS == (
        "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
        ".", "?", "!", ",", ":", "-", "--", "...", ";",
    )  # fmt: skip


def test_tokenize_captions_python_backend() -> None:
    out = tokenize_captions({7: ["A dog.", "Two cats!"], "x": ["Hi, there"]})
    assert out == {7: ["a dog", "two cats"], "x": ["hi there"]}
    with pytest.raises(TypeError, match="list of str"):
        tokenize_captions({0: "a dog"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="backend"):
        tokenize_captions({0: ["a"]}, backend="perl")  # type: ignore[arg-type]


def test_java_mode_errors_clearly() -> None:
    with pytest.raises(PTBTokenizerUnavailableError, match="not on PATH"):
        ptb_tokenize_java(["a dog"], java="definitely-not-a-java-binary")
    if shutil.which("java") is not None:
        with pytest.raises(PTBTokenizerUnavailableError, match="jar not found"):
            ptb_tokenize_java(["a dog"], jar="/nonexistent/corenlp.jar")
    assert ptb_tokenize_java([]) == []
    with pytest.raises(TypeError, match="single str"):
        ptb_tokenize_java("a dog")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# With Java + pycocoevalcap
# ---------------------------------------------------------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")

# Typical captions (COCO-style references and LLaVA-style generations) plus the tricky bits the
# approximation handles.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A group of people sitting at a table with plates of food.",
    (
        "The image shows a man riding a bike down a street. He is wearing a helmet, and there are "
        "cars parked on the side of the road."
    ),
    (
        "In the image, a woman is holding an umbrella while walking in the rain; she's wearing a "
        "red coat."
    ),
    "A close-up of a pizza with pepperoni, mushrooms, and olives on a wooden table.",
    "A black and white photo of an old train station (circa 1920).",
    'A street sign that says "Main St." on a pole.',
    "A person's hand holding a smartphone displaying the time 10:45.",
    "Several people are standing around a 5-year-old boy's birthday cake.",
    "Is this a dog or a cat? It's a dog.",
    "A bowl of fruit: apples, bananas, and oranges.",
    "A bus parked at the curb -- its doors are open.",
    "Two men playing frisbee in a park on a sunny day...",
    "A teddy bear sitting on top of a bed with pillows",
    "The U.S. Capitol building at night.",
    "Dr. Smith's office is on the 2nd floor.",
    "The clock on the tower shows it's almost 3 o'clock.",
    "The picture depicts a busy market with vendors selling fruits & vegetables.",
    "A woman wearing a hat (and sunglasses) sits on a bench.",
    "A stop sign at the corner of 5th Ave. and Main St.",
    "Vegetables, including carrots and broccoli, on a cutting board.",
    "the dogs' toys and the cat's toy",
    "rock 'n' roll 'cause o'clock y'all",
    "I'd've won't shan't ain't lemme gimme gotta",
    "he said 'hello' and 'em '70s",
    "wow!!! what?! #5 #tag a+b=c 100% $5",
    "word- -word --word word-- 3.14 and .5 and 5.0. end",
    "Ünïcödé café – naïve — “smart quotes” ‘single’ … end",
    "a man.A woman, a,b 1,000 1, 000",
    "okay.",
    "",
]


@needs_java
def test_java_mode_matches_pycocoevalcap_tokenizer() -> None:
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    captions = {i: [c] for i, c in enumerate(CAPTIONS)}
    expected = ptb.PTBTokenizer().tokenize(
        {k: [{"caption": c} for c in v] for k, v in captions.items()}
    )
    assert tokenize_captions(captions, backend="java") == expected


@needs_java
def test_approximation_matches_java_on_captions() -> None:
    pytest.importorskip("pycocoevalcap")
    exact = ptb_tokenize_java(CAPTIONS)
    approx = [ptb_tokenize(c) for c in CAPTIONS]
    mismatches = [(c, e, a) for c, e, a in zip(CAPTIONS, exact, approx) if e != a]
    assert mismatches == []


@needs_java
def test_java_mode_line_breaks_do_not_misalign() -> None:
    pytest.importorskip("pycocoevalcap")
    # "\r", "\u2028" and friends end a line for the Java lexer; they become spaces here.
    out = ptb_tokenize_java(["a\rdog.", "c\u2028d", "e\nf", "", "last."])
    assert out == ["a dog", "c d", "e f", "", "last"]


@needs_java
def test_end_to_end_cider_matches_pycocoevalcap() -> None:
    # Raw captions -> PTB tokenizer -> CIDEr-D, as lmms-eval's NoCaps / Flickr30k aggregators.
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    refs = {
        1: ["A man riding a horse on a beach.", "A person rides a brown horse near the ocean."],
        2: ["Two dogs play with a ball in the grass.", "Dogs playing in a park."],
        3: ["A plate of food with broccoli, rice and chicken.", "A dinner plate (with rice)."],
    }
    cands = {
        1: "A man is riding a horse on the beach.",
        2: "Two dogs playing with a ball.",
        3: "A plate of rice, chicken, and broccoli.",
    }
    tok = ptb.PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in cands.items()})
    expected, _ = cider_mod.Cider().compute_score(gts, res)

    for backend in ("java", "python"):
        t_refs = tokenize_captions(refs, backend=backend)
        t_cands = {
            k: v[0]
            for k, v in tokenize_captions(
                {k: [c] for k, c in cands.items()}, backend=backend
            ).items()
        }
        assert cider_d(t_refs, t_cands).score == pytest.approx(float(expected), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_approximation_total_on_any_text(text: str) -> None:
    out = ptb_tokenize(text)
    tokens = out.split(" ") if out else []
    assert all(tokens)  # single spaces, no empty tokens
    assert not set(tokens) & set(PUNCTUATIONS)
