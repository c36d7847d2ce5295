"""`TextStreamer`: generated token ids -> text to print as they arrive, exactly the final decode in the end.

Each push decodes the whole prefix with the tokenizer's own `decode` and returns what is new since the
last print, so the tokenizer's joining rules apply as in the final text: a sentencepiece `"▁"` becomes
a space only between words, byte-level pieces join into characters. Two things are held back until
a later token settles them: a trailing incomplete multi-byte character (the decoder shows it as
U+FFFD until its last byte arrives) and trailing whitespace (which the next piece may merge with).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

__all__ = ["TextStreamer"]

REPLACEMENT = "\ufffd"


class TextStreamer:
    """Incremental detokenization of one sequence.

        streamer = TextStreamer(processor.decode)
        for token_id in ids: print(streamer.push(token_id), end="", flush=True)
        print(streamer.flush())

    The pieces returned by `push` and `flush` concatenate to `decode(all ids)` for a decoder that keeps
    the settled text of a prefix (avl's tokenizers do). A decoder that rewrites returned text gets
    nothing more printed until `flush`, which then gives its final text after the part in common.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._printed = ""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now settled and not yet returned ("" if none)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids).rstrip(REPLACEMENT)
        text = text[: len(text.rstrip())]
        if not text.startswith(self._printed):
            return ""  # the decoder rewrote returned text (none of avl's tokenizers does): wait for the end
        return self._take(text)

    def flush(self) -> str:
        """The rest of the final text (what `push` held back)."""
        return self._take(self._decode(self._ids) if self._ids else "")

    def _take(self, text: str) -> str:
        """`text` after the part of it already returned, and remember it as returned."""
        new = text[len(os.path.commonprefix([self._printed, text])):]
        self._printed = text
        return new
