"""CIDEr-D: hand-computed cases, and equality with pycocoevalcap's ``Cider`` on the same
pre-tokenised input."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from avl.eval.metrics.cider import cider_d, ngram_counts


def test_ngram_counts() -> None:
    c = ngram_counts("a b a b", n=2)
    # unigrams a:2 b:2; bigrams (a b):2 (b a):1
    assert c == {("a",): 2, ("b",): 2, ("a", "b"): 2, ("b", "a"): 1}
    assert ngram_counts("") == {}


def test_identical_two_word_captions() -> None:
    # 2 images, idf of every n-gram = log 2 - log 1. Candidate == reference, so the cosine is 1
    # at orders 1 and 2; orders 3 and 4 have no n-grams (0). Lengths equal -> no penalty.
    # Image score = (1 + 1 + 0 + 0) / 4 / 1 reference * 10 = 5.
    refs = {1: ["a b"], 2: ["c d"]}
    cands = {1: "a b", 2: "c d"}
    result = cider_d(refs, cands)
    assert result.per_image == {1: pytest.approx(5.0), 2: pytest.approx(5.0)}
    assert result.score == pytest.approx(5.0)


def test_clipping_and_length_penalty() -> None:
    # Image 1: reference "x", candidate "x x". df(x) = 1, log N = log 2, so idf(x) = log 2 and
    # the unseen bigram (x x) gets idf log 2 - log(max(1, 0)) = log 2.
    #   order 1: cand {x: 2 log2} (norm 2 log2), ref {x: log2} (norm log2);
    #            clipped dot = min(2 log2, log2) * log2 = log2^2 -> cosine 1/2
    #            (un-clipped CIDEr would give 1).
    #   order 2: the reference has no bigram: dot 0, and the zero norm skips the division.
    #   length = number of bigrams: 1 vs 0 -> penalty exp(-1 / (2 * 6^2)) = exp(-1/72).
    #   score = (1/2 * exp(-1/72)) / 4 * 10 = 1.25 exp(-1/72)
    # Image 2: reference "y", candidate "z": nothing in common -> 0.
    refs = {"i1": ["x"], "i2": ["y"]}
    cands = {"i1": "x x", "i2": "z"}
    result = cider_d(refs, cands)
    assert result.per_image["i1"] == pytest.approx(1.25 * math.exp(-1 / 72), abs=1e-12)
    assert result.per_image["i2"] == 0.0
    assert result.score == pytest.approx(1.25 * math.exp(-1 / 72) / 2, abs=1e-12)


def test_mean_over_references() -> None:
    # Image 1 has two references, one identical to the candidate (similarity sum over orders 2,
    # as above) and one disjoint (0): (2 + 0) / 4 / 2 refs * 10 = 2.5.
    # Image 2 is there so that idf is not zero (log N = log 2).
    refs = {1: ["a b", "c d"], 2: ["e f"]}
    cands = {1: "a b", 2: "e f"}
    assert cider_d(refs, cands).per_image[1] == pytest.approx(2.5)


def test_single_image_scores_zero() -> None:
    # log N = 0 and every reference n-gram has df = 1: all idf weights vanish.
    assert cider_d({0: ["a cat on a mat"]}, {0: "a cat on a mat"}).score == 0.0


def test_empty_candidate_scores_zero() -> None:
    result = cider_d({0: ["a b"], 1: ["c d"]}, {0: "", 1: "c d"})
    assert result.per_image[0] == 0.0
    assert result.per_image[1] == pytest.approx(5.0)


def test_unicode_tokens() -> None:
    refs = {0: ["un café noir"], 1: ["猫 が いる"]}
    result = cider_d(refs, {0: "un café noir", 1: "猫 が いる"})
    # 3 words: orders 1-3 have n-grams, each cosine 1 -> (1+1+1+0)/4*10 = 7.5
    assert result.per_image[0] == pytest.approx(7.5)
    assert result.per_image[1] == pytest.approx(7.5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="same image keys"):
        cider_d({0: ["a"], 1: ["b"]}, {0: "a"})
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d({0: [], 1: ["b"]}, {0: "a", 1: "b"})
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d({0: "a b", 1: ["b"]}, {0: "a", 1: "b"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="one str"):
        cider_d({0: ["a"], 1: ["b"]}, {0: ["a"], 1: "b"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="no images"):
        cider_d({}, {})
    with pytest.raises(ValueError, match="sigma"):
        cider_d({0: ["a"]}, {0: "a"}, sigma=0.0)


# ---------------------------------------------------------------------------------------------
# Against pycocoevalcap
# ---------------------------------------------------------------------------------------------

_VOCAB = ["a", "man", "dog", "on", "the", "red", "table", "sitting", "with", "of"]
_caption = st.lists(st.sampled_from(_VOCAB), min_size=0, max_size=12).map(" ".join)
_corpus = st.integers(min_value=1, max_value=8).flatmap(
    lambda n_images: st.tuples(
        st.lists(st.lists(_caption, min_size=1, max_size=5), min_size=n_images, max_size=n_images),
        st.lists(_caption, min_size=n_images, max_size=n_images),
    )
)


def _pycoco_cider(refs: dict, cands: dict, n: int = 4, sigma: float = 6.0):
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    score, scores = cider_mod.Cider(n=n, sigma=sigma).compute_score(
        refs, {k: [v] for k, v in cands.items()}
    )
    return float(score), [float(s) for s in scores]


@settings(max_examples=60, deadline=None)
@given(_corpus)
def test_matches_pycocoevalcap_random(corpus: tuple[list[list[str]], list[str]]) -> None:
    ref_lists, cand_list = corpus
    # pycocoevalcap crashes (max() of an empty sequence) when no reference has a single word.
    assume(any(r.split() for refs in ref_lists for r in refs))
    refs = {i: r for i, r in enumerate(ref_lists)}
    cands = {i: c for i, c in enumerate(cand_list)}
    expected, expected_per_image = _pycoco_cider(refs, cands)
    got = cider_d(refs, cands)
    assert got.score == pytest.approx(expected, abs=1e-9)
    for key, exp in zip(refs, expected_per_image):  # pycocoevalcap keeps the key order
        assert got.per_image[key] == pytest.approx(exp, abs=1e-9)


FIXED_REFS = {
    "391895": [
        "a man with a red helmet on a small moped on a dirt road",
        "man riding a motor bike on a dirt road on the countryside",
        "a man riding on the back of a motorcycle",
        (
            "a dirt path with a young person on a motor bike rests to the foreground of a verdant "
            "area with a bridge and a background of cloud wreathed mountains"
        ),
        "a man in a red shirt and a red hat is on a motorcycle on a hill side",
    ],
    "522418": [
        "a woman wearing a net on her head cutting a cake",
        "a woman cutting a large white sheet cake",
        "a woman wearing a hair net cutting a large sheet cake",
        "there is a woman that is cutting a white cake",
        "a woman marking a cake with the back of a chef 's knife",
    ],
    "184613": [
        "a child holding a flowered umbrella and petting a yak",
        "a young man holding an umbrella next to a herd of cattle",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
        "a young boy with an umbrella who is touching the horn of a cow",
        "a boy holding an umbrella while standing next to livestock",
    ],
    "318219": [
        "a young boy standing in front of a computer keyboard",
        "a little boy wearing headphones and looking at a computer monitor",
        "he is listening intently to the computer at school",
        "a young boy stares up at the computer monitor",
        "a young kid with head phones on using a computer",
    ],
}
FIXED_CANDS = {
    "391895": "a man riding a motorcycle on a dirt road",
    "522418": "a woman cutting a cake with a knife",
    "184613": "a boy with an umbrella next to a cow",
    "318219": "a little boy using a computer with headphones -lrb- at school -rrb-",
}


def test_matches_pycocoevalcap_fixed() -> None:
    expected, expected_per_image = _pycoco_cider(FIXED_REFS, FIXED_CANDS)
    got = cider_d(FIXED_REFS, FIXED_CANDS)
    assert got.score == pytest.approx(expected, abs=1e-9)
    assert list(got.per_image.values()) == pytest.approx(expected_per_image, abs=1e-9)
    assert got.score > 0.5  # sanity: these are decent captions


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 20.0])
def test_matches_pycocoevalcap_other_sigma(sigma: float) -> None:
    # Only sigma: pycocoevalcap's n-gram extraction is fixed at order 4 whatever its `n`
    # (n < 4 raises IndexError there, n > 4 averages empty orders in).
    expected, _ = _pycoco_cider(FIXED_REFS, FIXED_CANDS, sigma=sigma)
    assert cider_d(FIXED_REFS, FIXED_CANDS, sigma=sigma).score == pytest.approx(expected, abs=1e-9)


def test_other_orders_hand() -> None:
    # n = 1: unigram cosine only, and no length penalty (no bigrams are counted as length).
    # Image 1: cand "a b" vs ref "a b c": idf of a, b, c = log 2 (2 images), cosine
    # = 2 / (sqrt(2) * sqrt(3)); image score = cosine * 10.
    refs = {1: ["a b c"], 2: ["d"]}
    cands = {1: "a b", 2: "d"}
    got = cider_d(refs, cands, n=1)
    assert got.per_image[1] == pytest.approx(10 * 2 / math.sqrt(6))
    assert got.per_image[2] == pytest.approx(10.0)
