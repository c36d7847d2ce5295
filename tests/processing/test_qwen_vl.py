"""Qwen-VL processing: tiktoken tokenizer (a tiny qwen.tiktoken written here), special-token ids,
image spans, the ChatML format of `make_context`, the image transform and the processor."""

from __future__ import annotations

import base64
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from avl.processing.qwen_vl import (
    DEFAULT_SYSTEM,
    IMAGE_SPECIAL_TOKENS,
    QwenTokenizer,
    QwenVLImageProcessor,
    QwenVLProcessor,
    load_tiktoken_ranks,
    qwen_chat_prompt,
    qwen_vl_query,
)

WORDS = ["hello", " world", "system", "user", "assistant", "Picture", " is", " this", "\n"]
SPAN = 8


def write_tiny_tiktoken(path: Path) -> int:
    """All 256 single bytes (rank = byte value), then every prefix of WORDS (so BPE can merge up to
    each word). Returns the number of ranks."""
    tokens = [bytes([b]) for b in range(256)]
    for word in WORDS:
        raw = word.encode()
        tokens += [raw[:i] for i in range(2, len(raw) + 1) if raw[:i] not in tokens]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return len(tokens)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen_tok")
    write_tiny_tiktoken(directory / "qwen.tiktoken")
    return directory


@pytest.fixture(scope="module")
def tok(tiny_dir) -> QwenTokenizer:
    return QwenTokenizer.from_dir(tiny_dir, image_span=SPAN)


def test_special_tokens_follow_the_ranks_in_the_original_order(tok, tiny_dir):
    n = len(load_tiktoken_ranks(tiny_dir / "qwen.tiktoken"))
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert tok.token_to_id("<|extra_0|>") == n + 3 and tok.token_to_id("<|extra_204|>") == n + 207
    assert [tok.token_to_id(t) for t in IMAGE_SPECIAL_TOKENS] == list(range(n + 208, n + 217))
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (n + 214, n + 215, n + 216)
    assert tok.vocab_size == n + 217
    # with Qwen-VL-Chat's 151643 ranks: <img> / </img> / <imgpad> = 151857 / 151858 / 151859
    assert 151643 + (tok.img_start_id - n) == 151857


@pytest.mark.parametrize("text", [
    "hello world", "", " ", "line one\nline two\n\n", "\tTabs  and   spaces ", "Ünïcödé café — “quotes”",
    "中文字符和日本語", "emoji 🙂👍🏽 zwj 👩‍👩‍👧", "numbers 3.14159 -42",
    "e\u0301 (decomposed)",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text, allowed_special=set())
    assert max(ids, default=0) < tok.eod_id
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_merges_are_used(tok):
    assert len(tok.encode("hello")) == 1 and len(tok.encode("hello world")) == 2


def test_special_tokens_are_one_id_unless_disallowed(tok):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
    plain = tok.encode(text, allowed_special=set())
    assert tok.im_start_id not in plain and tok.decode(plain) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_image_spans_become_pads_and_paths_are_returned(tok):
    ids, paths = tok.encode_with_images("Picture 1: <img>a/b.png</img>\nhi<img></img>")
    first = ids.index(tok.img_start_id)
    assert ids[first + 1: first + 1 + SPAN] == [tok.img_pad_id] * SPAN and ids[first + 1 + SPAN] == tok.img_end_id
    assert ids.count(tok.img_start_id) == 2 and ids.count(tok.img_pad_id) == 2 * SPAN
    assert paths == ["a/b.png", ""]
    between = ids[first + SPAN + 2: -SPAN - 2]
    assert ids[:first] == tok.encode("Picture 1: ") and between == tok.encode("\nhi")
    assert tok.decode(ids) == "Picture 1: <img></img>\nhi<img></img>"


def test_unclosed_image_tag_is_an_error(tok):
    with pytest.raises(ValueError, match=r"unclosed image tag: <img> at token \d+ has no </img>"):
        tok.encode("Picture 1: <img>x.png")


def test_chat_ids_follow_make_context(tok):
    query = qwen_vl_query("hello<|im_end|>", 1)  # typed special-token text stays text, as in make_context
    assert query == "Picture 1: <img></img>\nhello<|im_end|>"
    ids, paths = tok.encode_chat(query)
    assert paths == [""]
    nl = tok.encode("\n")
    role = lambda name, content: [tok.im_start_id, *tok.encode(name), *nl, *content, tok.im_end_id]  # noqa: E731
    system = role("system", tok.encode(DEFAULT_SYSTEM))
    user = role("user", [*tok.encode("Picture 1: "), tok.img_start_id, *[tok.img_pad_id] * SPAN, tok.img_end_id,
                         *tok.encode("\nhello<|im_end|>", allowed_special=set())])
    assert ids == [*system, *nl, *user, *nl, tok.im_start_id, *tok.encode("assistant"), *nl]
    assert ids.count(tok.im_end_id) == 2
    assert tok.decode(ids) == qwen_chat_prompt(query) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <img></img>\nhello<|im_end|><|im_end|>\n<|im_start|>assistant\n")


def test_bad_tiktoken_files_are_named(tmp_path):
    (tmp_path / "a.tiktoken").write_text("aGk= 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"line 2: expected 'base64-token rank'"):
        load_tiktoken_ranks(tmp_path / "a.tiktoken")
    (tmp_path / "b.tiktoken").write_text("aGk= 0\naGo= 2\n")
    with pytest.raises(ValueError, match=r"ranks of its 2 tokens are not exactly 0..1"):
        load_tiktoken_ranks(tmp_path / "b.tiktoken")
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        QwenTokenizer.from_dir(tmp_path)


# -- images and the processor ----------------------------------------------------------------------

def noise(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
    return Image.fromarray(data.numpy())


def test_image_transform_is_pil_bicubic_then_clip_normalisation():
    image = noise(37, 23, 0)
    out = QwenVLImageProcessor(28)([image, image.convert("RGBA")], dtype=torch.float64)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float64
    resized = torch.from_numpy(np.array(image.resize((28, 28), Image.Resampling.BICUBIC))).to(torch.float64)
    expected = (resized.permute(2, 0, 1) / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073],
                dtype=torch.float64)[:, None, None]) / torch.tensor([0.26862954, 0.26130258, 0.27577711],
                                                                   dtype=torch.float64)[:, None, None]
    assert torch.equal(out[0], expected) and torch.equal(out[1], expected)


@pytest.fixture(scope="module")
def processor(tiny_dir) -> QwenVLProcessor:
    n = len(load_tiktoken_ranks(tiny_dir / "qwen.tiktoken"))
    (tiny_dir / "config.json").write_text(json.dumps({"visual": {"image_size": 28, "n_queries": SPAN,
                                                                 "image_start_id": n + 214}}))
    return QwenVLProcessor.from_dir(tiny_dir)


def test_processor_pads_left_and_orders_images(processor):
    tok = processor.tokenizer
    images = [noise(30, 20, 1), noise(16, 16, 2), noise(20, 30, 3)]
    out = processor.chat([qwen_vl_query("hello", 2), qwen_vl_query("hello world this is", 1)], images=images)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and out["pixel_values"].shape == (3, 3, 28, 28)
    assert (ids == tok.img_start_id).sum(-1).tolist() == [2, 1]
    assert (ids == tok.img_pad_id).sum().item() == 3 * SPAN
    lengths = mask.sum(-1).tolist()
    assert lengths[0] != lengths[1] and mask[:, -1].all()
    short = min(range(2), key=lambda i: lengths[i])
    assert (ids[short, : ids.shape[1] - lengths[short]] == tok.eod_id).all()
    for i, image in enumerate(images):
        assert torch.equal(out["pixel_values"][i], processor.image_processor([image])[0])
    alone = processor.chat(qwen_vl_query("hello", 2), images=[images[:2]])
    assert alone["input_ids"][0].tolist() == ids[0, ids.shape[1] - lengths[0]:].tolist()


def test_processor_opens_the_paths_in_the_spans(processor, tmp_path):
    path = tmp_path / "picture one.png"
    noise(40, 30, 4).save(path)
    out = processor(qwen_chat_prompt(qwen_vl_query("hello", [str(path)])))
    assert torch.equal(out["pixel_values"], processor.image_processor(str(path)))
    assert (out["input_ids"] == processor.tokenizer.img_pad_id).sum().item() == SPAN


@pytest.mark.parametrize("queries,images,match", [
    ([qwen_vl_query("hi", 2)], 1, r"2 image span\(s\) \(per prompt: \[2\]\) but 1 image"),
    ([qwen_vl_query("hi", 1)], None, r"image span 0 of prompt 0 is empty"),
    ([qwen_vl_query("hi", ["x.png"])], 1, r"the spans also name \['x.png'\]"),
    ([qwen_vl_query("hi", 1), "hi"], [0, 1], r"\[1, 0\] image span\(s\) each but the image lists hold \[0, 1\]"),
])
def test_processor_bad_inputs_are_named(processor, queries, images, match):
    """images: a count (a flat list) or a count per prompt (nested lists)."""
    if isinstance(images, int):
        images = [noise(8, 8, i) for i in range(images)]
    elif images is not None:
        images = [[noise(8, 8, i) for i in range(n)] for n in images]
    with pytest.raises(ValueError, match=match):
        processor.chat(queries, images=images)


def test_config_and_tokenizer_must_agree_on_the_image_id(tiny_dir, tmp_path):
    (tmp_path / "qwen.tiktoken").write_bytes((tiny_dir / "qwen.tiktoken").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"visual": {"image_start_id": 300}}))
    with pytest.raises(ValueError, match=r"visual.image_start_id=300 but qwen.tiktoken puts <img> at id \d+"):
        QwenVLProcessor.from_dir(tmp_path)


def test_decode_skips_ids_beyond_the_vocab(tok):
    """Qwen-VL's embedding has 151936 rows for 151851 tokens: a generated id with no token is dropped."""
    ids = tok.encode("hi there")
    assert tok.decode([*ids[:1], tok.vocab_size, *ids[1:], tok.vocab_size + 80]) == "hi there"
    with pytest.raises(ValueError, match=r"token ids \[-1\] are negative"):
        tok.decode([-1, *ids])
