"""Policy sweeps: a grid of cache policies on one task -> one table (markdown, CSV) and a plot of
the task metric against the KV cache stored and against the time per output token, one line per
policy family.

Grid syntax (``--grid``, repeatable): ``"[policy:] field=v1,v2 field=v ..."``, the cartesian
product of the values, e.g. ``"secondary=0.3,0.5 core=0.1,0.2 refresh_every=3 prefill_keep=0.9
text_keep=0.5,1.0"`` (A-VL when no policy is named), ``"fastv: keep=0.25,0.5"``, ``"full"``.
Policy names and field names are those of :data:`avl.cache.registry.POLICIES` (the policies'
dataclass fields, the same table as ``avl generate --policy``); ``none`` turns an optional part
off, a tuple's items are separated by ``/`` (``"pyramiddrop: layers=8/16/24 keep=0.5,0.7"``), a
policy-typed field takes ``name(field=value;...)`` (``"adakv: scorer=knorm(keep=0.3),snapkv"``).
Combinations the policy rejects (e.g. ``core > secondary``) are skipped with a note. ``--baselines`` adds :data:`BASELINES`.

Each point runs into ``<out>/runs/<policy slug>/`` (so a sweep resumes like a single run), and the
table goes to ``<out>/sweep.md`` / ``sweep.csv``, the plot to ``<out>/sweep.png`` (needs the
optional matplotlib: ``pip install 'avl[plot]'``). A row is one policy's summary: the score, the
KV cache (``stored_pct`` / ``used_pct`` of the full cache, ``stored_mb`` / ``used_mb`` per sample)
and its efficiency (:mod:`avl.eval.efficiency`) in readable units: ``ttft_ms``,
``time_per_token_ms`` (n/a when no sample had a decode step), ``peak_memory_mb``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avl.cache.policies import FeaturePolicy, Policy, split_policy
from avl.cache.registry import POLICIES, field_types, parse_value, policy_name
from avl.eval.distributed import Dist
from avl.eval.results import MB
from avl.eval.runner import EvalConfig, LoadedModel, evaluate, load_for_eval, print_summary
from avl.inputs import check_policy

__all__ = ["BASELINES", "PLOT_AXES", "parse_grid", "plot_points", "plot_sweep", "policy_label", "policy_slug",
           "run_sweep", "sweep_table"]

BASELINES = ("full", "fastv: keep=0.5", "h2o: budget=0.5", "streaming: sinks=4 window=256")


def _family(policy: Policy) -> str:
    return policy_name(policy)


def _text(value: Any, tuple_sep: str = "/") -> str:
    """A field value as the grid writes it: a tuple `8/16/24` (`tuple_sep` between the items; a
    folder name takes `_`), a policy `name(field=value;...)`."""
    if isinstance(value, tuple):
        return tuple_sep.join(map(str, value))
    if isinstance(value, (Policy, FeaturePolicy)):
        return f"{policy_name(value)}({';'.join(f'{n}={_text(v, tuple_sep)}' for n, v in _changed(value))})"
    return str(value)


def _changed(policy: Policy) -> list[tuple[str, Any]]:
    """The fields worth naming, in declaration order: for a policy whose parts are optional (A-VL)
    those that differ from the defaults; for the baselines all of them (their defaults are settings)."""
    default = type(policy)()
    fields = dataclasses.fields(policy)
    optional = any(getattr(default, f.name) is None for f in fields)
    return [(f.name, getattr(policy, f.name)) for f in fields
            if not optional or getattr(policy, f.name) != getattr(default, f.name)]


def policy_slug(policy: Policy) -> str:
    """A folder name: ``avl-secondary0.3-core0.1-...``, ``full``."""
    return "-".join([_family(policy)] + [f"{name}{_text(value, '_')}" for name, value in _changed(policy)])


def policy_label(policy: Policy) -> str:
    """A table label: ``avl secondary=0.3 core=0.1``."""
    return " ".join([_family(policy)] + [f"{name}={_text(value)}" for name, value in _changed(policy)])


def parse_grid(spec: str, default_policy: str = "avl") -> tuple[list[Policy], list[str]]:
    """Policies of one grid spec, and a note for each combination the policy rejected."""
    name, body = (spec.split(":", 1) if ":" in spec else (None, spec))
    tokens = body.split()
    if name is None:
        name = tokens.pop(0) if tokens and "=" not in tokens[0] else default_policy
    name = name.strip().lower()
    if name not in POLICIES:
        raise ValueError(f"--grid {spec!r}: unknown policy {name!r}; known: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    kinds = field_types(cls)
    allowed = list(kinds)
    axes: dict[str, list[Any]] = {}
    for token in tokens:
        key, sep, values = token.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid {spec!r}: expected field=v1,v2, got {token!r}")
        if key not in allowed:
            raise ValueError(f"--grid {spec!r}: {name} has no field {key!r}; "
                             f"its fields: {', '.join(allowed) or 'none'}")
        try:
            axes[key] = [parse_value(kinds[key], v, key, tuple_sep="/") for v in values.split(",")]
        except ValueError as error:
            raise ValueError(f"--grid: {error}") from None
    policies: list[Policy] = []
    skipped: list[str] = []
    for combo in itertools.product(*axes.values()):
        fields = dict(zip(axes, combo, strict=True))
        try:
            policies.append(cls(**fields))
        except ValueError as error:
            skipped.append(f"skipped {name} {fields}: {error}")
    return policies, skipped


def sweep_policies(grids: Sequence[str], baselines: bool) -> tuple[list[Policy], list[str]]:
    """All policies of the grids (plus the baselines), without duplicates, in order."""
    policies: list[Policy] = []
    notes: list[str] = []
    for spec in [*grids, *(BASELINES if baselines else ())]:
        found, skipped = parse_grid(spec)
        notes += skipped
        policies += [p for p in found if p not in policies]
    if not policies:
        raise ValueError("the sweep has no valid policy: give --grid (and/or --baselines)"
                         + (f"; {'; '.join(notes)}" if notes else ""))
    return policies, notes


COLUMNS = ("policy", "family", "metric", "score", "stored_pct", "stored_mb", "used_pct", "used_mb", "ttft_ms",
           "time_per_token_ms", "peak_memory_mb", "samples", "failed", "generation_s", "out")
# the plot's panels: (row column on the x axis, its label)
PLOT_AXES = (("stored_mb", "KV cache stored per sample (MB)"), ("time_per_token_ms", "time per output token (ms)"))


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _row(summary: dict[str, Any], policy: Policy) -> dict[str, Any]:
    kv, efficiency = summary["kv_cache"], summary["efficiency"]
    return {"policy": policy_label(policy), "family": _family(policy), "metric": summary["metric"],
            "score": summary["score"], "stored_pct": kv["stored_pct"], "stored_mb": kv["stored_mb"],
            "used_pct": kv["used_pct"], "used_mb": kv["used_mb"], "ttft_ms": _scaled(efficiency["ttft_s"], 1e3),
            "time_per_token_ms": _scaled(efficiency["time_per_token_s"], 1e3),
            "peak_memory_mb": _scaled(efficiency["peak_memory_bytes"], 1 / MB), "samples": summary["samples"],
            "failed": summary["failed"], "generation_s": summary["generation_s"], "out": summary.get("out", "")}


def sweep_table(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(markdown, CSV) of the sweep rows."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return "n/a" if value is None else str(value)

    shown = [c for c in COLUMNS if c != "out"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in shown) + " |" for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(lines) + "\n", buffer.getvalue()


def plot_points(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """What the plot draws: per panel (its x column, :data:`PLOT_AXES`) and policy family, the
    (x, score) points sorted by x; rows without a score or an x value (no decode step) are left out."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for column, _ in PLOT_AXES:
        lines: dict[str, list[tuple[float, float]]] = {}
        for family in dict.fromkeys(r["family"] for r in rows):
            points = sorted((r[column], r["score"]) for r in rows
                            if r["family"] == family and r["score"] is not None and r[column] is not None)
            if points:
                lines[family] = points
        panels[column] = lines
    return panels


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Two panels side by side: the metric against the KV cache stored per sample and against the
    time per output token (:func:`plot_points`), one line per policy family. Returns None (and says
    why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("avl eval: no plot: matplotlib is not installed (pip install 'avl[plot]'); the table is written")
        return None
    families = list(dict.fromkeys(r["family"] for r in rows))  # one colour per family in both panels
    fig, panels = plt.subplots(1, len(PLOT_AXES), figsize=(11, 4), sharey=True)
    for ax, (_, label), lines in zip(panels, PLOT_AXES, plot_points(rows).values(), strict=True):
        for family, points in lines.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="*" if family == "full" else "o", linestyle="-" if len(points) > 1 else "none",
                    color=f"C{families.index(family) % 10}", label=family)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend()
    panels[0].set_ylabel(rows[0]["metric"] if rows else "score")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_sweep(base: EvalConfig, policies: Sequence[Policy], out: str | Path, loaded: LoadedModel | None = None,
              dist: Dist | None = None, plot: bool = True) -> list[dict[str, Any]] | None:
    """Evaluate every policy (model loaded once) and write the table and plot; rows on rank 0."""
    out = Path(out)
    dist = dist or Dist()
    loaded = loaded or load_for_eval(base.model, base.dtype, base.device, base.family)
    for policy in policies:  # every policy fits the model before the first run starts
        check_policy(loaded.model, *split_policy(policy))
    rows = []
    for policy in policies:
        config = dataclasses.replace(base, policy=policy, out=str(out / "runs" / policy_slug(policy)))
        summary = evaluate(config, loaded=loaded, dist=dist)
        if summary is not None:
            print_summary(summary)
            rows.append(_row(summary, policy))
    if not dist.is_main:
        return None
    markdown, table_csv = sweep_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(markdown, encoding="utf-8")
    (out / "sweep.csv").write_text(table_csv, encoding="utf-8")
    print(markdown)
    if plot:
        plot_sweep(rows, out / "sweep.png", f"{base.task}  ({Path(loaded.model_id).name})")
    return rows
