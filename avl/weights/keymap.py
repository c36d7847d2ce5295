"""Checkpoint key -> model parameter name, as one ordered table of rules per family."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

Rule = tuple["str | re.Pattern[str]", str]


@dataclass(frozen=True)
class KeyMap:
    """Rename rules from checkpoint keys to model parameter names, plus keys to ignore.

    ``rules`` is an ordered sequence of ``(checkpoint_prefix, model_prefix)``; the first rule
    whose prefix matches the start of a key replaces that prefix, the rest of the key is kept.
    Prefixes are plain string prefixes, so end them with ``"."`` to match whole components
    (``"model.layers.1."`` does not match ``model.layers.10``). A rule's left side may also be a
    compiled ``re.Pattern``: it is matched at the start of the key (``re.match``) and the matched
    text is replaced by ``match.expand(model_prefix)``, e.g.
    ``(re.compile(r"transformer\\.h\\.(\\d+)\\."), r"model.layers.\\1.")``. A key that no rule
    matches is kept unchanged, so ``KeyMap()`` is the identity.

    Several checkpoint layouts of one family (old ``language_model.model.layers.N`` and new
    ``model.language_model.layers.N``) are just more rules in the same table.

    ``ignore`` holds regular expressions searched (``re.search``) in the *checkpoint* key before
    any renaming; a match drops the tensor (rotary ``inv_freq`` buffers, unused vision layers).
    """

    rules: tuple[Rule, ...] = ()
    ignore: tuple[str, ...] = ()
    _ignore_re: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __init__(self, rules: Iterable[Rule] = (), ignore: Iterable[str] = ()) -> None:
        rules = tuple(tuple(r) for r in rules)  # type: ignore[misc]
        for rule in rules:
            if len(rule) != 2 or not isinstance(rule[0], (str, re.Pattern)) or not isinstance(rule[1], str):
                raise ValueError(
                    f"KeyMap rule {rule!r} must be (checkpoint_prefix: str | re.Pattern, model_prefix: str)"
                )
        if isinstance(ignore, str):
            raise ValueError(f"KeyMap ignore must be a sequence of regexes, got the string {ignore!r}")
        ignore = tuple(ignore)
        compiled = []
        for pattern in ignore:
            try:
                compiled.append(re.compile(pattern))
            except (re.error, TypeError) as e:
                raise ValueError(f"KeyMap ignore pattern {pattern!r} is not a valid regex: {e}") from e
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "ignore", ignore)
        object.__setattr__(self, "_ignore_re", tuple(compiled))

    def rename(self, key: str) -> str | None:
        """The model name for checkpoint ``key``, or ``None`` if the key is ignored."""
        if any(p.search(key) for p in self._ignore_re):
            return None
        for source, target in self.rules:
            if isinstance(source, str):
                if key.startswith(source):
                    return target + key[len(source) :]
            else:
                match = source.match(key)
                if match:
                    return match.expand(target) + key[match.end() :]
        return key
