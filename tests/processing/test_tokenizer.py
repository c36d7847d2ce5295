"""Tokenizer and the tiny tokenizer builder against transformers' tokenizers (the reference)."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avl.processing import Tokenizer
from avl.testing.llama_tokenizer import build_tiny_llama_tokenizer

STRINGS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "USER: <image>\n<image>\nCompare the two pictures. ASSISTANT: The first one is red.</s>",
    "<image>\nDescribe it.",
    "<image><image>",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "two  spaces and\ttab",
    "line one\nline two\n\nline four\r\n",
    "\nstarts with a newline",
    "Ünïcödé café, naïve façade — “quotes” … ½ ° ©",
    "中文字符和日本語のテキスト",
    "emoji 🙂🚀👍🏽 and zwj 👩‍👩‍👧",
    "special tokens as text: <s> </s> <unk> <pad> <0x41> <im age>",
    "numbers 0123456789 3.14159 -42 1e10",
    "The quick brown fox jumps over the lazy dog.",
    "Answer the question using a single word or phrase.",
    "x" * 300,
]


@pytest.fixture(scope="module")
def hf_auto(tiny_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tok_dir)


@pytest.fixture(scope="module")
def hf_fast(tiny_tok_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tiny_tok_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok(tiny_tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tok_dir)


def test_auto_tokenizer_is_llama_class(hf_auto):
    assert type(hf_auto).__name__ == "LlamaTokenizer"


@pytest.mark.parametrize("text", STRINGS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf_auto, hf_fast, text, add_special_tokens):
    ours = tok.encode(text, add_special_tokens=add_special_tokens)
    assert ours == hf_auto(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert ours == hf_fast(text, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("text", STRINGS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok, hf_auto, text, skip):
    ids = hf_auto(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=skip) == hf_auto.decode(ids, skip_special_tokens=skip)


def test_roundtrip_without_specials(tok):
    # (a leading space is absorbed by the Metaspace prefix, as in Llama's own tokenizer)
    for text in STRINGS:
        if "<" not in text and not text.startswith(" "):
            assert tok.decode(tok.encode(text)) == text


_PIECE = st.one_of(
    st.sampled_from(list("abcdeTHE ?!.,:'\"\n\t  ") + ["<image>", "<s>", "</s>", "USER:", " ASSISTANT:", "  "]),
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
    st.text(max_size=4),
)
_TEXT = st.lists(_PIECE, max_size=16).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXT)
def test_encode_decode_random_text(tok, hf_auto, text):
    ids = tok.encode(text)
    assert ids == hf_auto(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == hf_auto.decode(ids, skip_special_tokens=False)


def test_special_token_ids(tok, hf_auto, tiny_tok_dir):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        hf_auto.bos_token_id,
        hf_auto.eos_token_id,
        hf_auto.pad_token_id,
        hf_auto.unk_token_id,
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.token_to_id("<image>") == hf_auto.convert_tokens_to_ids("<image>") == 510
    assert tok.token_to_id("<pad>") == 511
    assert tok.token_to_id("<no such token>") is None
    assert tok.vocab_size == len(hf_auto) == 512


@pytest.mark.parametrize("vocab_size", [325, 400, 1000])
def test_builder_exact_vocab_size(tmp_path, vocab_size):
    from transformers import AutoTokenizer

    info = build_tiny_llama_tokenizer(tmp_path, vocab_size=vocab_size)
    assert info["image_token_id"] == vocab_size - 2 and info["pad_token_id"] == vocab_size - 1
    tok = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == len(hf) == vocab_size
    assert max(hf.get_vocab().values()) == vocab_size - 1
    assert tok.token_to_id("<image>") == info["image_token_id"]
    assert hf.convert_tokens_to_ids("<pad>") == info["pad_token_id"] == hf.pad_token_id
    text = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    assert tok.encode(text) == hf(text)["input_ids"]
    assert all(i < vocab_size for i in tok.encode("any ünïcode 🙂 text"))


def test_builder_files_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tiny_llama_tokenizer(a)
    build_tiny_llama_tokenizer(b)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    config = json.loads((a / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] is True
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["pad_token"] == "<pad>"
    assert config["model_max_length"] == 4096
    spec = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert spec["model"]["byte_fallback"] is True and spec["pre_tokenizer"]["type"] == "Metaspace"
    assert [spec["model"]["vocab"][t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]


def test_builder_rejects_small_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_llama_tokenizer(tmp_path, vocab_size=100)


def test_add_bos_token_in_config_does_not_override_tokenizer_json(tmp_path, tiny_tok_dir):
    """transformers 5 drops add_bos_token/add_eos_token from tokenizer_config.json when a tokenizer.json
    exists: the file's post-processor decides. We do the same."""
    from transformers import AutoTokenizer

    d = tmp_path / "nobos"
    shutil.copytree(tiny_tok_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    config["add_eos_token"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    for text in STRINGS[:6]:
        assert ours.encode(text) == ref(text)["input_ids"]


def test_explicit_bos_eos_flags_rebuild_post_processor(tiny_tok_dir):
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(tiny_tok_dir / "tokenizer.json"))
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", add_bos_token=False, add_eos_token=True)
    plain = tok.encode("hi there", add_special_tokens=False)
    assert tok.encode("hi there") == plain + [2]
    with pytest.raises(ValueError, match="bos token"):
        Tokenizer(Backend.from_file(str(tiny_tok_dir / "tokenizer.json")), bos_token="<nope>", add_bos_token=True)


def test_legacy_normalizer_file_followed_like_fast_tokenizer(tmp_path, tiny_tok_dir):
    """A Llama-2 legacy-format tokenizer.json (normalizer Prepend+Replace, no pre-tokenizer) is used as
    written, like `PreTrainedTokenizerFast` does (transformers 5's `LlamaTokenizer` instead rebuilds the
    non-legacy Metaspace pipeline, which drops the "▁" that follows a special token)."""
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "legacy"
    shutil.copytree(tiny_tok_dir, d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["pre_tokenizer"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec))
    ours = Tokenizer.from_dir(d)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    for text in STRINGS:
        assert ours.encode(text) == ref(text)["input_ids"]
    ids = ours.encode("USER: <image>\nHi")
    assert ids[ids.index(510) + 1] == ours.token_to_id("▁")


def test_special_tokens_map_fallback(tmp_path, tiny_tok_dir):
    d = tmp_path / "map_only"
    d.mkdir()
    shutil.copy(tiny_tok_dir / "tokenizer.json", d / "tokenizer.json")
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "pad_token": "<unk>"})
    )
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.encode("hi")[0] == 1  # the file's own post-processor is kept


def test_tokenizer_without_configs(tmp_path, tiny_tok_dir):
    shutil.copy(tiny_tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id is None and tok.eos_token_id is None and tok.pad_token_id is None


def test_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        Tokenizer.from_dir(missing)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match=r"token ids \[-3\] are negative"):
        tok.decode([1, -3])
    with pytest.raises(TypeError, match="str"):
        tok.encode(["not", "a", "string"])  # type: ignore[arg-type]


def test_decode_accepts_tensor(tok):
    import torch

    ids = tok.encode("What is this?")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "What is this?"


def test_decode_skips_ids_the_tokenizer_does_not_know(tok):
    """A checkpoint's vocab may exceed its tokenizer's (llava-1.5-7b-hf: 32064 vs 32002): an id with
    no token is dropped, the rest of the answer survives (as in the tokenizers library)."""
    ids = tok.encode("What is this?")
    unknown = tok.vocab_size + 5
    assert tok.decode([*ids[:2], unknown, *ids[2:], tok.vocab_size]) == "What is this?"
