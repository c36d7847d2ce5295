"""The report's figures in the paper's style, drawn with Pillow (no plotting library needed).

- `shares.png`: each modality's share of the attention over the steps (Fig. 1);
- `concentration.png`: per layer, the share of image rows holding `mass` of the image attention,
  at the prefill's last row (t = 0) and averaged over the decode steps t >= 1 (Fig. 3);
- `ppci_layers.png`: per layer, the PPCI of its top image rows with layer 0's at t = 0 (Fig. 4);
- `ppci_steps.png`: per layer and step, the PPCI with the layer's own top rows at t = 0, a heat map (Fig. 5).

A cross-attention report (Llama-3.2-Vision) has no modal shares, so no `shares.png`; its layer axes
are its cross-attention layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from avl.analysis.report import MODALITIES, AttentionReport

__all__ = ["FIGURES", "write_figures"]

FIGURES = ("shares.png", "concentration.png", "ppci_layers.png", "ppci_steps.png")
SIZE = (720, 460)
MARGIN = (78, 48, 150, 62)  # left, top, right (legend / colour bar), bottom
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
# viridis at 0, 1/4, 1/2, 3/4, 1
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _viridis(value: float) -> tuple[int, int, int]:
    """An approximation of matplotlib's viridis at `value` in [0, 1]."""
    position = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    low = min(int(position), len(VIRIDIS) - 2)
    share = position - low
    return tuple(round(a + (b - a) * share) for a, b in zip(VIRIDIS[low], VIRIDIS[low + 1]))  # type: ignore[return-value]


def _ticks(count: int) -> list[int]:
    """At most about 10 integer ticks over 0 .. count - 1, at a step of 1, 2 or 5 times a power of ten."""
    if count <= 1:
        return [0]
    magnitude = 10 ** math.floor(math.log10(max(count - 1, 1)))
    step = next(s * magnitude for s in (0.1, 0.2, 0.5, 1, 2, 5, 10) if (count - 1) / (s * magnitude) <= 10)
    step = max(1, int(step))
    return list(range(0, count, step))


class _Axes:
    """A blank figure with a title and the plot area's data-to-pixel mapping."""

    def __init__(self, title: str, x_label: str, y_label: str, x_range: tuple[float, float],
                 y_range: tuple[float, float]) -> None:
        self.image = Image.new("RGB", SIZE, "white")
        self.draw = ImageDraw.Draw(self.image)
        left, top, right, bottom = MARGIN
        self.box = (left, top, SIZE[0] - right, SIZE[1] - bottom)
        self.x_range, self.y_range = x_range, y_range
        self.font, self.small = _font(15), _font(12)
        self.draw.text((SIZE[0] / 2, 14), title, fill="black", font=_font(16), anchor="mt")
        self.draw.text(((self.box[0] + self.box[2]) / 2, SIZE[1] - 10), x_label, fill="black", font=self.font,
                       anchor="mb")
        label = Image.new("RGBA", (self.box[3] - self.box[1], 22), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((label.width / 2, 11), y_label, fill="black", font=self.font, anchor="mm")
        rotated = label.rotate(90, expand=True)
        self.image.paste(rotated, (8, self.box[1]), rotated)

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.box[0] + (value - low) / ((high - low) or 1) * (self.box[2] - self.box[0])

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.box[3] - (value - low) / ((high - low) or 1) * (self.box[3] - self.box[1])

    def frame(self, x_ticks: Sequence[float], y_ticks: Sequence[float], grid: bool = True) -> None:
        """The box, ticks with labels and (optionally) horizontal grid lines."""
        for value in y_ticks:
            y = self.y(value)
            if grid:
                self.draw.line((self.box[0], y, self.box[2], y), fill="#dddddd")
            self.draw.line((self.box[0] - 5, y, self.box[0], y), fill="black")
            self.draw.text((self.box[0] - 8, y), f"{value:g}", fill="black", font=self.small, anchor="rm")
        for value in x_ticks:
            x = self.x(value)
            self.draw.line((x, self.box[3], x, self.box[3] + 5), fill="black")
            self.draw.text((x, self.box[3] + 8), f"{value:g}", fill="black", font=self.small, anchor="mt")
        self.draw.rectangle(self.box, outline="black")

    def legend(self, names: Sequence[str]) -> None:
        x, y = self.box[2] + 14, self.box[1] + 6
        for i, name in enumerate(names):
            self.draw.line((x, y + 22 * i + 7, x + 22, y + 22 * i + 7), fill=COLORS[i % len(COLORS)], width=3)
            self.draw.text((x + 28, y + 22 * i + 7), name, fill="black", font=self.small, anchor="lm")

    def save(self, path: Path) -> Path:
        self.image.save(path, format="PNG")
        return path


def line_figure(path: Path, title: str, x_label: str, y_label: str, series: dict[str, Sequence[float]]) -> Path:
    """Lines with markers over x = 0, 1, ..., y in [0, 1], a legend on the right."""
    count = max(len(values) for values in series.values())
    axes = _Axes(title, x_label, y_label, (-0.5, count - 0.5), (0.0, 1.0))
    axes.frame(_ticks(count), [i / 5 for i in range(6)])
    for i, values in enumerate(series.values()):
        color = COLORS[i % len(COLORS)]
        points = [(axes.x(t), axes.y(v)) for t, v in enumerate(values)]
        if len(points) > 1:
            axes.draw.line(points, fill=color, width=3, joint="curve")
        for px, py in points:
            axes.draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    axes.legend(list(series))
    return axes.save(path)


def bar_figure(path: Path, title: str, x_label: str, y_label: str, values: Sequence[float]) -> Path:
    """One bar per x = 0, 1, ..., y in [0, 1]."""
    axes = _Axes(title, x_label, y_label, (-0.5, len(values) - 0.5), (0.0, 1.0))
    axes.frame(_ticks(len(values)), [i / 5 for i in range(6)])
    half = 0.4 * (axes.x(1) - axes.x(0))
    for i, value in enumerate(values):
        axes.draw.rectangle((axes.x(i) - half, axes.y(value), axes.x(i) + half, axes.y(0.0)), fill=COLORS[0])
    return axes.save(path)


def heat_map_figure(path: Path, title: str, x_label: str, y_label: str, values: Sequence[Sequence[float]]) -> Path:
    """values[row][column] in [0, 1] as viridis cells (row 0 at the top), with a colour bar."""
    rows, columns = len(values), len(values[0])
    axes = _Axes(title, x_label, y_label, (-0.5, columns - 0.5), (rows - 0.5, -0.5))
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            axes.draw.rectangle((axes.x(c - 0.5), axes.y(r - 0.5), axes.x(c + 0.5), axes.y(r + 0.5)),
                                fill=_viridis(value))
    axes.frame(_ticks(columns), _ticks(rows), grid=False)
    left, top, bottom = axes.box[2] + 24, axes.box[1], axes.box[3]
    for y in range(top, bottom):
        axes.draw.line((left, y, left + 18, y), fill=_viridis((bottom - y) / (bottom - top)))
    axes.draw.rectangle((left, top, left + 18, bottom), outline="black")
    for value in (0.0, 0.5, 1.0):
        y = bottom - value * (bottom - top)
        axes.draw.text((left + 24, y), f"{value:g}", fill="black", font=axes.small, anchor="lm")
    return axes.save(path)


def write_figures(report: AttentionReport, directory: str | Path) -> list[Path]:
    """Write the figures (`FIGURES`; all but `shares.png` for a report without modal shares) of
    `report` into `directory`; returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    scope = f"mean of {report.samples} samples" if report.samples > 1 else "one sample"
    cross = report.attention == "cross"
    layer, rows = ("cross-attention layer", "image features") if cross else ("layer", "image tokens")
    decode = report.concentration[1:]
    concentration = {"prefill (t=0)": report.concentration[0]}
    if decode:
        concentration["decode (mean)"] = [sum(c) / len(decode) for c in zip(*decode)]
    shares = [] if report.modal_shares is None else [
        line_figure(out / FIGURES[0], f"Attention share per modality ({scope})", "step t", "share of attention",
                    {m: [s[m] for s in report.modal_shares] for m in MODALITIES})]
    return shares + [
        line_figure(out / FIGURES[1], f"Image attention concentration ({scope})", layer,
                    f"share of {rows} ({report.mass:g} mass)", concentration),
        bar_figure(out / FIGURES[2], f"PPCI with {layer} 0, top {report.top:g} ({scope})", layer, "PPCI",
                   report.ppci_layers),
        heat_map_figure(out / FIGURES[3], f"PPCI with step 0 per {layer}, top {report.top:g} ({scope})", "step t",
                        layer, report.ppci_steps),
    ]
