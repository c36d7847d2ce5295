"""Streaming: `generate(on_token=...)` hands over each step's tokens before the next decode step, and
`TextStreamer` turns ids into printable pieces that add up to the tokenizer's own decode of all ids."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import avl
from avl.processing import TextStreamer, Tokenizer
from avl.processing.auto import load_chat_processor
from avl.testing.llama_tokenizer import build_tiny_llama_tokenizer
from avl.testing.llava_checkpoint import build_tiny_llava
from avl.testing.qwen2_tokenizer import build_tiny_qwen2_tokenizer

# multi-byte characters the tiny vocabularies lack (byte-fallback / byte-level pieces), spaces to merge,
# punctuation after a space, a newline
TEXTS = ["The naïve café serves crème brûlée 🙂 and 日本語 too.", "Two  spaces , then\nok: 😀😀!", "ünï"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tokenizer(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    (build_tiny_llama_tokenizer if request.param == "llama" else build_tiny_qwen2_tokenizer)(directory)
    return Tokenizer.from_dir(directory)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_add_up_to_the_final_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    final = tokenizer.decode(ids)
    streamer = TextStreamer(tokenizer.decode)
    printed = ""
    for token_id in ids:
        piece = streamer.push(token_id)
        assert "\ufffd" not in piece  # never half a character
        printed += piece
        assert final.startswith(printed)  # never anything the final text does not have
    pieces_before_the_end = printed
    printed += streamer.flush()
    assert printed == final
    assert len(pieces_before_the_end) >= len(final) // 2  # the text arrives as it is decoded, not at the end


def test_an_incomplete_character_is_held_back(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # several byte pieces in these vocabularies
    streamer = TextStreamer(tokenizer.decode)
    assert [streamer.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert streamer.push(ids[-1]) == "🙂" and streamer.flush() == ""


def test_a_decoder_that_rewrites_returned_text_prints_nothing_twice():
    texts = {(1,): "ab", (1, 2): "ax", (1, 2, 3): "axyz"}
    streamer = TextStreamer(lambda ids: texts[tuple(ids)])
    assert [streamer.push(i) for i in (1, 2, 3)] == ["ab", "", ""]
    assert streamer.flush() == "xyz"  # the rest after the common "a"


@torch.inference_mode()
def test_generate_hands_over_each_token_before_the_next_step(tmp_path):
    directory = build_tiny_llava(tmp_path / "tiny")
    model = avl.load(directory)
    processor = load_chat_processor(directory)
    inputs = processor(["Color?"], [Image.new("RGB", (50, 70), (200, 10, 10))])
    events: list[object] = []
    decode = model.decode

    def logged_decode(*args, **kwargs):
        events.append("decode")
        return decode(*args, **kwargs)

    model.decode = logged_decode
    streamer = TextStreamer(processor.decode)
    printed: list[str] = []

    def on_token(token: torch.Tensor) -> None:
        events.append(token.clone())
        printed.append(streamer.push(int(token[0])))

    out = avl.generate(model, **inputs, max_new_tokens=6, on_token=on_token)
    tokens = [e for e in events if not isinstance(e, str)]
    assert len(tokens) == out.tokens.shape[1] == 6
    assert all(torch.equal(t, out.tokens[:, i]) for i, t in enumerate(tokens))
    assert ["token" if isinstance(e, torch.Tensor) else e for e in events] == ["token", "decode"] * 5 + ["token"]
    assert "".join(printed) + streamer.flush() == processor.decode(out.tokens[0])
