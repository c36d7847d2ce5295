"""Errors raised while reading checkpoints.

Missing files (no ``config.json``, no weights file, a shard named by the index that is not on
disk) raise the builtin ``FileNotFoundError``; a checkpoint whose *content* is wrong (invalid
JSON, keys or shapes that do not match the model) raises ``CheckpointError``.
"""

from __future__ import annotations

from collections.abc import Sequence

#: How many names each list in an error message shows before it says "... and N more".
MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint's content does not match what the model (or the file format) expects.

    The structured lists are kept as attributes so that callers and tests can inspect them:

    Attributes:
        missing: model parameter / buffer names with no checkpoint tensor.
        unexpected: checkpoint keys (after renaming) with no model parameter, not ignored.
        mismatched: ``(model_name, checkpoint_shape, expected_shape)`` triples.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


def format_list(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c`` — at most ``limit`` items, then ``... and N more``."""
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return shown
