"""The one table of policy names: `avl generate`, `avl demo`, `avl eval` and sweeps all read it.

`POLICIES` maps a name to its dataclass; every field of that dataclass is settable from the
command line (`--<name>-<field>`, see `avl.cli_policies`) and from a sweep grid (`"name: field=v1,v2"`),
with values parsed by `parse_value` from the field's annotation. A field added to a policy
dataclass therefore appears in both without editing either.

Values: numbers; `none` for an optional field; `a,b,c` for a tuple of integers (PyramidDrop's
stages; in a grid, separate the tuple's items with `/` since `,` separates grid values); a policy
for a policy-typed field (AdaKV's scorer) as `name` or `name(field=value;field=value)`, e.g.
`snapkv(keep=0.3;window_size=8)`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV
from avl.cache.policies import AVL, H2O, FastV, FeaturePolicy, Full, Policy, StreamingLLM
from avl.cache.token_pruning import PyramidDrop
from avl.cache.trim import Trim
from avl.cache.visionzip import VisionZip
from avl.cache.vl_cache import VLCache

POLICIES: dict[str, type[Policy] | type[FeaturePolicy]] = {
    "full": Full,
    "avl": AVL,
    "fastv": FastV,
    "h2o": H2O,
    "streaming": StreamingLLM,
    "trim": Trim,
    "pyramiddrop": PyramidDrop,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "knorm": KNorm,
    "observed": ObservedAttention,
    "random": RandomEviction,
    "vlcache": VLCache,
    "visionzip": VisionZip,
}


def policy_name(policy: object) -> str:
    """The registry name of a policy object (its class name in lower case if it is not registered)."""
    return next((name for name, cls in POLICIES.items() if type(policy) is cls), type(policy).__name__.lower())


def policy_class(name: str) -> type[Policy] | type[FeaturePolicy]:
    """The class registered as `name`; raises ValueError naming the known names."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]


def field_types(cls: type) -> dict[str, Any]:
    """Each dataclass field's resolved annotation, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of an annotation like `float | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return (args[0] if len(args) == 1 else kind), len(args) < len(typing.get_args(kind))
    return kind, False


def describe(kind: Any) -> str:
    """A short name of a field's type for help texts: `float`, `int or none`, `ints a,b,...`, `policy`."""
    base, optional = _optional(kind)
    if typing.get_origin(base) is tuple:
        text = "ints a,b,..."
    elif isinstance(base, type) and issubclass(base, (Policy, FeaturePolicy)):
        text = "policy name(field=value;...)"
    else:
        text = getattr(base, "__name__", str(base))
    return f"{text} or none" if optional else text


def parse_value(kind: Any, text: str, name: str, tuple_sep: str = ",") -> Any:
    """`text` as a value of annotation `kind` (a field named `name`, for the error message)."""
    base, optional = _optional(kind)
    if optional and text.strip().lower() == "none":
        return None
    try:
        if base is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str:
            return text
        if typing.get_origin(base) is tuple:
            return tuple(int(x) for x in text.split(tuple_sep))
        if isinstance(base, type) and issubclass(base, (Policy, FeaturePolicy)):
            return parse_policy(text)
    except ValueError as error:
        if str(error).startswith(("unknown policy", "policy ")):
            raise ValueError(f"{name}={text!r}: {error}") from None
        raise ValueError(f"{name}={text!r} is not a {describe(kind)}") from None
    raise ValueError(f"{name}: fields of type {kind!r} cannot be set from text")


def parse_policy(text: str) -> Policy | FeaturePolicy:
    """`name` or `name(field=value;field=value)` -> the policy object (validated by its dataclass)."""
    name, _, rest = text.strip().partition("(")
    cls = policy_class(name.strip())
    if rest and not rest.endswith(")"):
        raise ValueError(f"policy {text!r} is missing its closing ')'; allowed: name(field=value;...)")
    kinds = field_types(cls)
    values: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest[:-1].split(";"))):
        key, sep, value = item.partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"policy {text!r}: {item!r} is not field=value of {name}; "
                             f"its fields: {', '.join(kinds) or 'none'}")
        values[key] = parse_value(kinds[key], value, key)
    return cls(**values)
