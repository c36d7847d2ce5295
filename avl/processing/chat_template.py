"""Rendering a checkpoint's own jinja2 `chat_template`, as transformers' `apply_chat_template` does.

The environment is transformers' (`utils/chat_template_utils.py`): a sandboxed jinja2 environment
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, the `{% generation %}` block
tag (it renders its body; transformers uses it to mark assistant tokens), `raise_exception`,
`strftime_now`, and a `tojson` filter that does not escape HTML. A template is read from the
checkpoint directory: `chat_template.jinja`, else `chat_template.json`, else the
`chat_template` entry of `tokenizer_config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from avl.processing.files import read_optional_json

Message = Mapping[str, Any]  # {"role": ..., "content": str | [{"type": "text" | "image", ...}, ...]}


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """The text `template` renders for `messages` (extra template variables, e.g. `bos_token`, as keywords).

    Raises:
        ValueError: the template is not valid jinja2, or it raised (`raise_exception`) for these messages.
    """
    if not isinstance(template, str) or not template:
        raise ValueError(f"chat template must be a non-empty string, got {template!r}")
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e


def read_chat_template(directory: str | Path) -> str | None:
    """The chat template of a checkpoint directory, or None when it ships none."""
    root = Path(directory)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = read_optional_json(root / name).get("chat_template")
        if isinstance(template, str):
            return template
        if template is not None:
            raise ValueError(f"chat_template in {str(root / name)!r} must be a string (one template), "
                             f"got {type(template).__name__}")
    return None
