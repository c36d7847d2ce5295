"""PTB tokenisation of captions as pycocoevalcap does it, before BLEU / CIDEr.

pycocoevalcap 1.2 ``tokenizer/ptbtokenizer.py`` (used by lmms-eval's NoCaps and Flickr30k
aggregators) runs the Stanford CoreNLP 3.4.1 ``edu.stanford.nlp.process.PTBTokenizer`` with
``-preserveLines -lowerCase`` on all captions (one per line, ``"\\n"`` inside a caption replaced
by a space), then drops every token that is in :data:`PUNCTUATIONS` and joins the rest with
single spaces.

Two ways to get there:

* :func:`ptb_tokenize` -- a pure-Python approximation of that Java tokenizer, exact on ordinary
  caption text (words, numbers like ``1,000`` / ``10.5`` / ``3:30``, hyphenated words,
  clitics ``n't 's 're 've 'll 'd 'm``, possessive ``s'``, quotes, brackets, ``, ; : ! ?``,
  sentence-final periods, common abbreviations such as ``mr.`` ``st.`` ``u.s.``). Known
  differences are rarer constructs: the Java lexer's full abbreviation list, runs like
  ``"x..."`` (``x. . .`` there), SGML-like tags, emoticons, URLs and a few currency / symbol
  conversions.
* :func:`ptb_tokenize_java` -- the exact tokenizer: calls the CoreNLP jar shipped inside an
  installed ``pycocoevalcap`` (or one you name) with ``java``. Raises
  :class:`PTBTokenizerUnavailableError` if either is missing.

Faithful quirks: the Java tokenizer lower-cases its bracket escapes (``-lrb-``), while the
punctuation list holds them upper-case (``-LRB-``), so bracket tokens survive in pycocoevalcap's
output; square brackets become ``-lsb-``/``-rsb-``, which are not in the list either. Tokens
like ``!!``, ``?!``, ``&``, ``%``, ``$`` and ``#`` are kept.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

__all__ = [
    "PUNCTUATIONS",
    "PTBTokenizerUnavailableError",
    "find_corenlp_jar",
    "ptb_tokenize",
    "ptb_tokenize_java",
    "tokenize_captions",
]

K = TypeVar("K", bound=Hashable)

# pycocoevalcap ``ptbtokenizer.PUNCTUATIONS``, verbatim (case included).
PUNCTUATIONS: tuple[str, ...] = (
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
    ".", "?", "!", ",", ":", "-", "--", "...", ";",
)  # fmt: skip
_PUNCT_SET = frozenset(PUNCTUATIONS)

CORENLP_JAR_NAME = "stanford-corenlp-3.4.1.jar"


class PTBTokenizerUnavailableError(RuntimeError):
    """The exact (Java) PTB tokenizer cannot run: no ``java`` on PATH or no CoreNLP jar."""


# ---------------------------------------------------------------------------------------------
# Pure-Python approximation
# ---------------------------------------------------------------------------------------------

# Characters the Java lexer maps to other tokens (PTB3 escaping): curly quotes, dashes,
# ellipsis, some currency signs, non-breaking space.
_CHAR_MAP = {
    "\u201c": ' " ',  # left double quote -> opening ``
    "\u201d": '"',  # right double quote -> closing ''
    "\u2018": "'",
    "\u2019": "'",
    "\u2013": " -- ",
    "\u2014": " -- ",
    "\u2026": " ... ",
    "\u00a3": "#",
    "\u20ac": "$",
    "\u00a2": " cents ",
    "\u00a0": " ",
}
_CHAR_TABLE = str.maketrans(_CHAR_MAP)

_BRACKETS = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
}  # fmt: skip
# Characters always split off as their own token.
_SPLIT_CHARS = ",;:&*+=~^|\\$%<>"
_WORD = r"(?:[^\s\"()\[\]{}!?" + re.escape(_SPLIT_CHARS) + r"]|(?<=\d)[,:](?=\d))+"
_RAW_TOKEN = re.compile(
    r"(?P<quote>\")|(?P<bracket>[()\[\]{}])|(?P<bang>[!?]+)|(?P<word>" + _WORD + r")|(?P<char>\S)"
)

# Abbreviations (lower case, without the final period) whose period the Java lexer keeps.
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "st", "mt", "ft", "vs", "etc", "inc", "co", "ltd", "corp", "jr", "sr",
    "prof", "gen", "capt", "sgt", "lt", "col", "rev", "ave", "rd", "blvd", "dept", "est", "jan",
    "feb", "aug", "sept", "oct", "nov", "dec",
))  # fmt: skip
_INITIALS = re.compile(r"(?:[^\W\d_]\.)+")  # "u.s.", "e.g.", "a.m.", "j."
# Words beginning with an apostrophe that the lexer keeps whole.
_APOSTROPHE_WORDS = re.compile(r"'(?:em|cause|n'|\d\ds)")
_SPECIAL_SPLITS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "wanna": ["wan", "na"],
    "gotta": ["got", "ta"],
    "lemme": ["lem", "me"],
    "gimme": ["gim", "me"],
    "'tis": ["'t", "is"],
    "'twas": ["'t", "was"],
    "y'all": ["y'", "all"],
}
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")


def _is_abbreviation(word: str, next_is_digit: bool) -> bool:
    # ``word`` ends with "."
    stem = word[:-1]
    if stem == "no":  # "no. 5" keeps its period, "said no." does not
        return next_is_digit
    return stem in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def _split_clitics(core: str) -> list[str]:
    if core in _SPECIAL_SPLITS:
        return list(_SPECIAL_SPLITS[core])
    back: list[str] = []
    while True:
        for clitic in _CLITICS:
            if core.endswith(clitic) and len(core) > len(clitic):
                back.insert(0, clitic)
                core = core[: -len(clitic)]
                break
        else:
            if core.endswith("n't") and len(core) > 3:
                back.insert(0, "n't")
                core = core[:-3]
                continue
            break
    return [core, *back]


def _split_word(word: str, next_is_digit: bool) -> list[str]:
    """Tokens of one maximal run of word characters (letters, digits, . ' ` - / # @ ...)."""
    out: list[str] = []
    # Dash runs and an apostrophe between digits (5'9) are tokens of their own.
    for i, piece in enumerate(re.split(r"(-{2,}|(?<=\d)'(?=\d))", word)):
        if i % 2 == 1:
            out.append("'" if piece == "'" else "--")
        elif piece:
            out.extend(_split_piece(piece, next_is_digit))
    return out


def _split_piece(piece: str, next_is_digit: bool) -> list[str]:
    if re.fullmatch(r"\.{3,}", piece):
        return ["..."]
    front: list[str] = []
    back: list[str] = []
    # Leading: opening single quotes, a hyphen, "#" before a number.
    while piece:
        if piece[0] in "'`" and not (
            _APOSTROPHE_WORDS.fullmatch(piece)
            or piece in _SPECIAL_SPLITS
            or piece in _CLITICS
            or piece == "n't"
        ):
            front.append("`")
            piece = piece[1:]
        elif piece[0] == "-" and len(piece) > 1:
            front.append("-")
            piece = piece[1:]
        elif piece[0] == "#" and len(piece) > 1 and piece[1].isdigit():
            front.append("#")
            piece = piece[1:]
        else:
            break
    # Trailing: ellipsis, hyphen, closing quote, periods.
    while piece:
        if piece.endswith("...") and len(piece) > 3:
            back.insert(0, "...")
            piece = piece.rstrip(".")
        elif piece.endswith("-") and len(piece) > 1:
            back.insert(0, "-")
            piece = piece[:-1]
        elif piece.endswith("'") and len(piece) > 1 and piece not in ("'n'", "y'"):
            back.insert(0, "'")
            piece = piece[:-1]
        elif (
            piece.endswith(".")
            and len(piece) > 1
            and not _is_abbreviation(piece, next_is_digit and not back)
        ):
            back.insert(0, ".")
            piece = piece[:-1]
        else:
            break
    if piece in ("...", "'", "`", "-", "."):
        return [*front, piece, *back]
    core = _split_clitics(piece) if piece else []
    return [*front, *core, *back]


def _ptb_tokens(text: str) -> list[str]:
    text = text.translate(_CHAR_TABLE).lower()
    matches = list(_RAW_TOKEN.finditer(text))
    tokens: list[str] = []
    for idx, m in enumerate(matches):
        kind = m.lastgroup
        tok = m.group()
        if kind == "quote":
            start = m.start()
            opening = start == 0 or text[start - 1].isspace() or text[start - 1] in "([{<"
            tokens.append("``" if opening else "''")
        elif kind == "bracket":
            tokens.append(_BRACKETS[tok])
        elif kind == "word":
            nxt = matches[idx + 1].group() if idx + 1 < len(matches) else ""
            tokens.extend(_split_word(tok, nxt[:1].isdigit()))
        else:  # "!?" runs and single split characters
            tokens.append(tok)
    return tokens


def ptb_tokenize(text: str) -> str:
    """Approximate pycocoevalcap tokenisation of one caption: PTB tokens, lower-cased, tokens in
    :data:`PUNCTUATIONS` removed, joined by single spaces.

    >>> ptb_tokenize("A man's hat, on the table.")
    "a man 's hat on the table"
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return " ".join(t for t in _ptb_tokens(text) if t not in _PUNCT_SET)


# ---------------------------------------------------------------------------------------------
# Exact mode: the Java tokenizer
# ---------------------------------------------------------------------------------------------

# Characters the Java lexer treats as line ends (found by running it): a caption containing one
# would be split over two lines. pycocoevalcap only replaces "\n" (and so misaligns captions
# that contain "\r"); we replace all of them by a space.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


def find_corenlp_jar() -> Path:
    """Path of the CoreNLP jar shipped with the installed ``pycocoevalcap``.

    Raises :class:`PTBTokenizerUnavailableError` if pycocoevalcap is not installed or lacks it.
    """
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise PTBTokenizerUnavailableError(
            "the exact PTB tokenizer needs the CoreNLP jar from pycocoevalcap, which is not "
            "installed (pip install pycocoevalcap), or pass jar=... explicitly"
        )
    for location in spec.submodule_search_locations:
        jar = Path(location) / "tokenizer" / CORENLP_JAR_NAME
        if jar.is_file():
            return jar
    raise PTBTokenizerUnavailableError(
        f"pycocoevalcap is installed but {CORENLP_JAR_NAME} is not in its tokenizer/ folder"
    )


def ptb_tokenize_java(
    texts: Sequence[str],
    *,
    jar: str | Path | None = None,
    java: str = "java",
    timeout: float | None = 600.0,
) -> list[str]:
    """Exact pycocoevalcap tokenisation of several captions, through the Java PTBTokenizer.

    Runs ``java -cp <jar> edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase``
    once on all captions (one per line, on stdin, UTF-8), drops :data:`PUNCTUATIONS` tokens.
    ``jar`` defaults to :func:`find_corenlp_jar`. Raises :class:`PTBTokenizerUnavailableError`
    when ``java`` or the jar is missing, ``RuntimeError`` if the process fails or returns a
    different number of lines.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, got a single str")
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"caption must be a str, got {type(t).__name__}: {t!r}")
    if len(texts) == 0:
        return []
    java_path = shutil.which(java)
    if java_path is None:
        raise PTBTokenizerUnavailableError(
            f"the exact PTB tokenizer needs a Java runtime, but {java!r} is not on PATH; "
            "install one (e.g. a JRE) or use ptb_tokenize() / backend='python'"
        )
    jar_path = Path(jar) if jar is not None else find_corenlp_jar()
    if not jar_path.is_file():
        raise PTBTokenizerUnavailableError(f"CoreNLP jar not found: {jar_path}")
    lines = [_LINE_BREAKS.sub(" ", t) for t in texts]
    cmd = [
        java_path, "-cp", str(jar_path), "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines", "-lowerCase", "-encoding", "utf-8",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        input="\n".join(lines).encode("utf-8"),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTBTokenizer failed with exit code {proc.returncode}: "
            f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    out_lines = proc.stdout.decode("utf-8").split("\n")
    if len(out_lines) != len(lines):
        raise RuntimeError(
            f"PTBTokenizer returned {len(out_lines)} lines for {len(lines)} captions"
        )
    return [
        " ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCT_SET)
        for line in out_lines
    ]


def tokenize_captions(
    captions: Mapping[K, Sequence[str]],
    *,
    backend: Literal["python", "java"] = "python",
) -> dict[K, list[str]]:
    """Tokenise ``{image: [caption, ...]}`` like ``PTBTokenizer().tokenize`` (which takes
    ``{image: [{"caption": str}, ...]}``) and return ``{image: [tokenised, ...]}``.

    ``backend="python"`` uses :func:`ptb_tokenize`; ``backend="java"`` the exact
    :func:`ptb_tokenize_java` (one Java call for all captions).
    """
    keys = list(captions)
    for key in keys:
        if isinstance(captions[key], str):
            raise TypeError(f"image {key!r}: captions must be a list of str, not one str")
    if backend == "python":
        return {key: [ptb_tokenize(c) for c in captions[key]] for key in keys}
    if backend != "java":
        raise ValueError(f"backend must be 'python' or 'java', got {backend!r}")
    flat = [c for key in keys for c in captions[key]]
    tokenized = iter(ptb_tokenize_java(flat))
    return {key: [next(tokenized) for _ in captions[key]] for key in keys}
