"""The cache-policy options of every `avl` subcommand that takes a policy (`generate`, `demo`, `eval`).

`--policy NAME` picks a class of `avl.cache.registry.POLICIES`; each field of each registered policy
dataclass is one option `--<name>-<field>` (plus the flag it had before the options were derived,
where it had one), parsed by `avl.cache.registry.parse_value` from the field's annotation. A field
added to a policy dataclass, or a policy added to the registry, therefore appears here without edits.
"""

from __future__ import annotations

import argparse
import dataclasses

from avl.cache.policies import FeaturePolicy, Policy
from avl.cache.registry import POLICIES, describe, field_types, parse_value

__all__ = ["LEGACY_FLAGS", "add_policy_options", "policy_from_args"]

# the flags these fields had before the options were derived from the dataclasses (kept as aliases)
LEGACY_FLAGS = {
    ("avl", "secondary"): "--secondary", ("avl", "core"): "--core", ("avl", "refresh_every"): "--refresh-every",
    ("avl", "prefill_keep"): "--prefill-keep", ("avl", "prefill_layer"): "--prefill-layer",
    ("avl", "text_keep"): "--text-keep", ("h2o", "heavy_share"): "--heavy-share",
    ("streaming", "sinks"): "--sinks", ("streaming", "window"): "--window", ("streaming", "positions"): "--positions",
}


def _flags(name: str, field: str) -> list[str]:
    """The option strings of a policy field: the legacy flag first (if any), then `--<name>-<field>`."""
    derived = f"--{name}-{field.replace('_', '-')}"
    legacy = LEGACY_FLAGS.get((name, field))
    return [legacy, derived] if legacy else [derived]


def _dest(name: str, field: str) -> str:
    return f"policy__{name}__{field}"


def policy_from_args(args: argparse.Namespace) -> Policy | FeaturePolicy:
    """The policy named by --policy with the fields given as options. Raises ValueError for another
    policy's field or a bad value."""
    for name, cls in POLICIES.items():
        if name == args.policy:
            continue
        stray = [f for f in field_types(cls) if getattr(args, _dest(name, f), None) is not None]
        if stray:
            raise ValueError(f"{_flags(name, stray[0])[0]} belongs to --policy {name}, not --policy {args.policy}")
    cls = POLICIES[args.policy]
    given = {f: parse_value(kind, text, f) for f, kind in field_types(cls).items()
             if (text := getattr(args, _dest(args.policy, f), None)) is not None}
    return cls(**given)


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """--policy and one option per field of every registered policy (`avl.cache.registry.POLICIES`)."""
    group = parser.add_argument_group("cache policy", "each policy's fields, as its dataclass has them "
                                      "(avl.cache.registry describes the value syntax)")
    group.add_argument("--policy", choices=list(POLICIES), default="full")
    for name, cls in POLICIES.items():
        for f in dataclasses.fields(cls):
            kind = field_types(cls)[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(*_flags(name, f.name), dest=_dest(name, f.name),
                               metavar=describe(kind).split()[0].upper(),
                               help=f"{cls.__name__}.{f.name} ({describe(kind)}; default {default!r})"
                               .replace("%", "%%"))
