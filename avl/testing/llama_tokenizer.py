"""A tiny Llama-2-style tokenizer, built offline with the `tokenizers` library.

Used by tests and by the demo that builds a tiny random LLaVA checkpoint on a fresh machine. The
layout follows the llava-hf LLaVA-1.5 tokenizer at a small scale:

- ids 0, 1, 2 = `<unk>`, `<s>`, `</s>`; ids 3..258 = the byte-fallback tokens `<0x00>`..`<0xFF>`;
  then BPE tokens trained on a short embedded English text;
- BPE with `byte_fallback=True` and `fuse_unk=True`, no normalizer, a `Metaspace` pre-tokenizer
  (`"▁"`, `prepend_scheme="first"`, `split=False`), i.e. the Llama-2 tokenizer in its
  non-legacy form, which is also the backend that transformers 5's `LlamaTokenizer` rebuilds
  from the file's vocab and merges, so that `AutoTokenizer` and `tokenizers.Tokenizer.from_file`
  tokenize identically;
- `<image>` and `<pad>` added as special tokens at the last two ids (as 32000 and 32001 in
  llava-hf/llava-1.5-7b-hf); the post-processor prepends `<s>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS, IMAGE, PAD = "<unk>", "<s>", "</s>", "<image>", "<pad>"
_N_SPECIAL = 3
_N_BYTES = 256
_N_ADDED = 2  # <image>, <pad>
MIN_VOCAB_SIZE = _N_SPECIAL + _N_BYTES + _N_ADDED + 64

_CORPUS = """\
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in this image? ASSISTANT: The image shows a red bus on a city street.
USER: How many people are in the picture? ASSISTANT: There are three people standing near the door.
USER: Describe the image in detail. ASSISTANT: A small brown dog is sitting on a green lawn next to a white fence.
USER: What color is the car? ASSISTANT: The car is blue, and it is parked in front of a tall building.
USER: Is there any text in the image? ASSISTANT: Yes, the sign says "Open 24 hours" in large letters.
USER: Answer the question using a single word or phrase. ASSISTANT: Yes.
USER: What time of day is it? ASSISTANT: It looks like the early evening, because the sky is orange.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Vision language models read an image and a question, and then they write an answer one token at a time.
The model keeps keys and values for every token in a cache, so that it does not compute them again.
Images are split into patches of fourteen by fourteen pixels, and each patch becomes one token.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 100 336 576 1024 2048.
Punctuation, like commas, periods. Questions? Exclamations!
Quotes 'single' and "double"; colons: dashes - and (brackets).
She said that the kitten was playing with a ball of yarn under the kitchen table.
They walked along the river, watching the boats and the birds, until the sun went down.
"""


def build_tiny_llama_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab_size: int = 512,
    *,
    model_max_length: int = 4096,
) -> dict[str, int]:
    """Build and save a tiny Llama-style tokenizer with exactly `vocab_size` ids.

    Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into
    `out_dir` (created if needed). Deterministic: the same arguments give the same files.

    Returns:
        `{"image_token_id": vocab_size - 2, "pad_token_id": vocab_size - 1,
        "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, "vocab_size": vocab_size}`.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (3 specials + 256 bytes + 2 added + 64 BPE), "
            f"got {vocab_size!r}"
        )
    n_model = vocab_size - _N_ADDED  # ids held by the BPE model itself
    n_bpe = n_model - _N_SPECIAL - _N_BYTES  # trained characters and merges
    trained_vocab, merges = _train_bpe(n_bpe)

    vocab: dict[str, int] = {UNK: 0, BOS: 1, EOS: 2}
    for b in range(_N_BYTES):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token in trained_vocab:
        vocab[token] = len(vocab)
    # A tiny corpus may run out of merges before the target size: fill with unreachable tokens.
    filler = 0
    while len(vocab) < n_model:
        vocab[f"<unused{filler}>"] = len(vocab)
        filler += 1
    assert len(vocab) == n_model

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)]
    tok.add_special_tokens(specials)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE, PAD)])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"built {tok.get_vocab_size(with_added_tokens=True)} ids, wanted {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)]
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {UNK: 0, BOS: 1, EOS: 2, IMAGE: vocab_size - 2, PAD: vocab_size - 1}
    added_tokens_decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return {
        "image_token_id": ids[IMAGE],
        "pad_token_id": ids[PAD],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
        "vocab_size": vocab_size,
    }


def _train_bpe(n_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train BPE on the embedded corpus; return up to `n_tokens` tokens (id order) and merges."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # split=True while training keeps merges inside words, like SentencePiece's "▁word" pieces.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=n_tokens + 1, special_tokens=[UNK], min_frequency=1, show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    ordered = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in ordered if t != UNK][:n_tokens]
    kept = set(tokens)
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ")
        if a in kept and b in kept and a + b in kept:
            merges.append((a, b))
    return tokens, merges
