"""Metrics of the A-VL paper's evaluation (lmms-eval tasks DocVQA, TextVQA, OCRBench, NoCaps,
Flickr30k, VQAv2), each in its own module with the source of every rule in its docstring.

Official definitions are the defaults; the lmms-eval 0.2.x behaviour that produced the paper's
numbers is available where it differs (``nls_hit_rate``, ``variant="lmms_eval"``).
"""

from avl.eval.metrics.anls import (
    anls,
    anls_question,
    levenshtein_distance,
    nls_hit,
    nls_hit_rate,
    normalized_levenshtein_similarity,
)
from avl.eval.metrics.cider import CiderResult, cider_d, ngram_counts
from avl.eval.metrics.ocrbench import (
    OCRBENCH_CATEGORIES,
    OCRBENCH_GROUPS,
    OCRBenchResult,
    ocrbench_match,
    ocrbench_score,
)
from avl.eval.metrics.ptb_tokenize import (
    PUNCTUATIONS,
    PTBTokenizerUnavailableError,
    ptb_tokenize,
    ptb_tokenize_java,
    tokenize_captions,
)
from avl.eval.metrics.vqa import (
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    textvqa_accuracy,
    vqav2_accuracy,
)

__all__ = [
    "OCRBENCH_CATEGORIES",
    "OCRBENCH_GROUPS",
    "PUNCTUATIONS",
    "CiderResult",
    "OCRBenchResult",
    "PTBTokenizerUnavailableError",
    "anls",
    "anls_question",
    "cider_d",
    "leave_one_out_accuracy",
    "levenshtein_distance",
    "ngram_counts",
    "nls_hit",
    "nls_hit_rate",
    "normalize_answer",
    "normalized_levenshtein_similarity",
    "ocrbench_match",
    "ocrbench_score",
    "process_digit_article",
    "process_punctuation",
    "ptb_tokenize",
    "ptb_tokenize_java",
    "textvqa_accuracy",
    "tokenize_captions",
    "vqav2_accuracy",
]
