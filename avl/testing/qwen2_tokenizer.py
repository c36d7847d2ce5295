"""A tiny Qwen2-style tokenizer (`tokenizer.json` + `tokenizer_config.json`), built offline for tests.

The pipeline is Qwen2's (transformers' `Qwen2Tokenizer`): NFC normalisation, the Qwen2 split regex
(isolated), byte-level BPE without a prefix space, a byte-level decoder; BPE merges trained on a
short embedded text over the 256 byte symbols. The special tokens of llava-hf's LLaVA-OneVision
tokenizer follow: `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos), `<image>`, `<video>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

_CORPUS = """\
What is shown in this image? The image shows a red bus on a city street.
How many people are in the picture? There are three people standing near the door.
Describe the image in detail. A small brown dog is sitting on a green lawn next to a white fence.
What color is the car? The car is blue, and it is parked in front of a tall building.
Is there any text in the image? Yes, the sign says "Open 24 hours" in large letters.
Answer the question using a single word or phrase. Compare these two images.
You are a helpful assistant. user assistant system
"""


def build_tiny_qwen2_tokenizer(directory: str | os.PathLike[str], merges: int = 200) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` of a tiny Qwen2 tokenizer into `directory`.

    Ids 0..255 are the byte symbols, then `merges` trained merges at most, then the five special
    tokens. Returns the directory.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[])
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return root
