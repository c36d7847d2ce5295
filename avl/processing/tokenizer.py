"""A small typed wrapper around a `tokenizers.Tokenizer` loaded from a checkpoint directory.

`tokenizer.json` is the single source of the tokenization rules, including whether `<s>` / `</s>`
are added (its post-processor). `tokenizer_config.json` (and, for keys it lacks,
`special_tokens_map.json`) only name the bos/eos/pad/unk tokens. Like transformers 5, which drops
`add_bos_token` / `add_eos_token` from the config whenever a `tokenizer.json` exists, `from_dir`
ignores those two flags; pass them to the constructor to rebuild the post-processor explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _BackendTokenizer
from tokenizers import processors

from avl.processing.files import read_optional_json

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value: Any) -> str | None:
    """A special-token entry is a string or an AddedToken dict {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}")


class Tokenizer:
    """Text <-> token ids for one checkpoint.

    Args:
        backend: the `tokenizers.Tokenizer` (from `tokenizer.json`).
        bos_token, eos_token, pad_token, unk_token: special token strings, or None.
        add_bos_token, add_eos_token: if either is given (not None), the post-processor is
            replaced by one that adds exactly these tokens (a None one counts as False); if both
            are None, the backend's own post-processor is kept.
    """

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        self._tok = backend
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `<path>/tokenizer.json` plus `tokenizer_config.json` / `special_tokens_map.json` if present.

        Raises:
            FileNotFoundError: `path` is not a directory or has no `tokenizer.json`.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {str(root)!r}")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            present = sorted(p.name for p in root.iterdir())
            raise FileNotFoundError(
                f"no tokenizer.json in {str(root)!r} (files: {present}); only the `tokenizers` "
                "JSON format is supported (convert a SentencePiece tokenizer.model with transformers first)"
            )
        try:
            backend = _BackendTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot load {str(tok_file)!r}: {e}") from e
        config = read_optional_json(root / "tokenizer_config.json")
        special_map = read_optional_json(root / "special_tokens_map.json")
        # tokenizer_config.json first; special_tokens_map.json fills the tokens it does not name
        specials = {
            key: _token_content(config[key] if config.get(key) is not None else special_map.get(key))
            for key in _SPECIAL_KEYS
        }
        return cls(backend, **specials)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos_id, eos_id = self.bos_token_id, self.eos_token_id
        if add_bos and bos_id is None:
            raise ValueError(f"add_bos_token is set but the bos token {self.bos_token!r} is not in the vocabulary")
        if add_eos and eos_id is None:
            raise ValueError(f"add_eos_token is set but the eos token {self.eos_token!r} is not in the vocabulary")
        bos = f"{self.bos_token}:0 " if add_bos else ""
        eos = f" {self.eos_token}:0" if add_eos else ""
        single = f"{bos}$A:0{eos}"
        bos_b = f"{self.bos_token}:1 " if add_bos else ""
        eos_b = f" {self.eos_token}:1" if add_eos else ""
        pair = f"{single} {bos_b}$B:1{eos_b}"
        special = ([(self.bos_token, bos_id)] if add_bos else []) + ([(self.eos_token, eos_id)] if add_eos else [])
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @property
    def backend(self) -> _BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary or added token), or None if unknown."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None if out of range."""
        return self._tok.id_to_token(token_id)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, None if there is none."""
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, None if there is none."""
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, None if there is none (or it is not in the vocabulary)."""
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token, None if there is none."""
        return self._id_of(self.unk_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a leading `<s>`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for several texts (no padding)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects strings, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor of ints).

        Ids the tokenizer does not know are skipped, as the tokenizers library does: a checkpoint's
        embedding is often padded beyond its tokenizer (llava-hf/llava-1.5-7b-hf: 32064 rows, 32002
        tokens), so a generated id can have no token, and the rest of the answer is still text.
        Negative ids are not token ids at all: ValueError.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # type: ignore[union-attr]
        ids = [int(i) for i in ids]
        negative = [i for i in ids if i < 0]
        if negative:
            raise ValueError(f"token ids {negative[:8]} are negative; allowed: ids >= 0")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r})"
        )
