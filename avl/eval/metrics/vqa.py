"""VQA accuracy (VQAv2, TextVQA) with the official answer normalisation.

Sources of the rules:

* Official VQA evaluation, GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
  (current version, commit "Fixed processing answers bug", 2021): tables ``contractions``,
  ``manualMap`` (number words), ``articles``, ``punct``, regexes ``periodStrip`` and
  ``commaStrip``, functions ``processPunctuation`` and ``processDigitArticle``, and
  ``evaluate``:

  - prediction and ground truths: ``\\n`` and ``\\t`` -> space, strip;
  - only if the ground truths are not all identical, all of them *and* the prediction go
    through ``processPunctuation`` then ``processDigitArticle``; otherwise strings are compared
    as they are (so ``"Yes"`` scores 0 against ten ``"yes"``: the official evaluation expects
    submitted answers to be normalised already);
  - accuracy = mean over the ``n`` leave-one-out subsets of the ground truths (``n = 10`` in
    VQAv2) of ``min(1, #matches in the subset / 3)``.

* EvalAI answer processor (facebookresearch/mmf ``pythia/tasks/processors.py``
  ``EvalAIAnswerProcessor``, copied into lmms-eval as
  ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py``): ``word_tokenize`` (lower-case, delete
  ``,`` and ``?``, ``'s`` -> `` 's``, strip), ``\\n``/``\\t`` -> space, strip, then the two
  official steps. Its ``COMMA_STRIP`` is ``(?<=\\d)(\\,)+(?=\\d)`` where the official one is
  ``(\\d)(\\,)(\\d)`` (they differ only on runs like ``"1,,2"``).

* lmms-eval 0.2.x ``vqav2_process_results`` (``lmms_eval/tasks/vqav2/utils.py``): the
  prediction is first passed through the full EvalAI processor, then the official ``evaluate``
  logic runs unchanged (including a second punctuation/digit-article pass on the prediction
  when the ground truths differ). Differences from the official script that follow: the
  prediction is always lower-cased and normalised even when the ground truths are unanimous,
  and ``"'s"`` becomes ``" 's"`` in the prediction only, so ``"man's"`` no longer matches a
  ground truth ``"man's"`` when the ground truths differ.

* TextVQA (mmf ``TextVQAAccuracyEvaluator``; lmms-eval 0.2.x ``textvqa_process_results`` does
  the same): prediction and every ground truth go through the full EvalAI processor,
  unconditionally; then the leave-one-out accuracy above.

Fewer than 10 answers: every reference implementation applies the same leave-one-out average
over however many answers there are, and so do we. With ``n`` answers a perfect prediction
scores ``min(1, (n-1)/3)``: 0 for a single answer, 1/3 for two, 2/3 for three, 1 from four on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from avl.eval.metrics.checks import check_ground_truths, check_str

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_MAP",
    "PUNCTUATION",
    "leave_one_out_accuracy",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "textvqa_accuracy",
    "vqav2_accuracy",
]

# Official vqaEval.py ``contractions``, entry for entry (including its oddities, e.g.
# "somebody'd" -> "somebodyd"). Keys with capitals ("Im", "Ive", "Id've", "I'dve") can never
# match, because processDigitArticle lower-cases before the lookup; kept for fidelity.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# Official ``manualMap``: number words up to ten (and "none") become digits.
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Official ``punct``, in order (order matters: replacements are applied one after the other).
# Note what is absent: "'" ":" "." (periods have their own rule), "#", "$", "%", "&", "*".
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip

# ``(?!<=\d)`` is a typo for a look-behind in the original; as written it is a look-ahead that
# never fails in front of ".", so the rule is: delete a "." that is not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes ``re.UNICODE`` (= 32) positionally to ``Pattern.sub``, where it is
# the ``count`` argument: at most 32 periods are deleted per string. Kept for fidelity.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")

VqaVariant = Literal["official", "lmms_eval"]


def _process_punctuation(text: str, comma_strip: re.Pattern[str]) -> str:
    out = text
    digit_comma = comma_strip.search(text) is not None
    for p in PUNCTUATION:
        # Tests look at the *input* text, replacements accumulate on the output.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    For each punctuation mark ``p`` of :data:`PUNCTUATION`: if ``p`` touches a space somewhere
    in the input (``p + " "`` or ``" " + p`` occurs), or the input contains a comma between two
    digits anywhere, ``p`` is deleted; otherwise it is replaced by a space. Then every period
    not followed by a digit is deleted (so ``"10.5"`` keeps its period, ``"2."`` loses it).
    """
    return _process_punctuation(text, _COMMA_STRIP_OFFICIAL)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, map number words to
    digits (:data:`NUMBER_MAP`), drop articles (:data:`ARTICLES`), expand
    :data:`CONTRACTIONS` (e.g. ``"dont"`` -> ``"don't"``), join with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """The EvalAI answer processor (mmf / lmms-eval ``EvalAIAnswerProcessor.__call__``).

    ``word_tokenize`` (lower-case; delete ``,`` and ``?``; ``'s`` -> `` 's``; strip), then
    ``\\n``/``\\t`` -> space and strip, then :func:`process_punctuation` (with EvalAI's
    comma-between-digits regex) and :func:`process_digit_article`.
    """
    check_str(answer, "answer")
    item = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    item = item.replace("\n", " ").replace("\t", " ").strip()
    item = _process_punctuation(item, _COMMA_STRIP_EVALAI)
    return process_digit_article(item)


def leave_one_out_accuracy(prediction: str, ground_truths: Sequence[str]) -> float:
    """``mean_i min(1, #{j != i : gt_j == prediction} / 3)`` over the ``n`` ground truths.

    Strings are compared exactly as given (normalise them first). With 10 answers this is the
    VQA accuracy: an answer given by >= 4 annotators scores 1, by 3 scores 0.9, 2 -> 0.6,
    1 -> 0.3.
    """
    gts = check_ground_truths(ground_truths)
    check_str(prediction, "prediction")
    n_match = sum(1 for gt in gts if gt == prediction)
    total = 0.0
    for gt in gts:
        # Matches among the other n-1 answers: drop this one if it matched.
        others = n_match - (1 if gt == prediction else 0)
        total += min(1.0, others / 3.0)
    return total / len(gts)


def vqav2_accuracy(
    prediction: str, ground_truths: Sequence[str], *, variant: VqaVariant = "official"
) -> float:
    """VQA accuracy of one question.

    ``variant="official"``: the GT-Vision-Lab ``vqaEval.py`` procedure (see module docstring).
    ``variant="lmms_eval"``: lmms-eval 0.2.x ``vqav2_process_results``, which first runs the
    full EvalAI processor (:func:`normalize_answer`) on the prediction; this is the number the
    A-VL paper's VQAv2 results were computed with.
    """
    gts = [_clean(gt) for gt in check_ground_truths(ground_truths)]
    check_str(prediction, "prediction")
    if variant == "official":
        pred = _clean(prediction)
    elif variant == "lmms_eval":
        pred = normalize_answer(prediction)
    else:
        raise ValueError(f"variant must be 'official' or 'lmms_eval', got {variant!r}")
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(gt)) for gt in gts]
        pred = process_digit_article(process_punctuation(pred))
    return leave_one_out_accuracy(pred, gts)


def textvqa_accuracy(prediction: str, ground_truths: Sequence[str]) -> float:
    """TextVQA accuracy of one question (mmf ``TextVQAAccuracyEvaluator`` = lmms-eval 0.2.x
    ``textvqa_process_results``): :func:`normalize_answer` on the prediction and on every
    ground truth, then :func:`leave_one_out_accuracy`."""
    gts = [normalize_answer(gt) for gt in check_ground_truths(ground_truths)]
    return leave_one_out_accuracy(normalize_answer(prediction), gts)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()
