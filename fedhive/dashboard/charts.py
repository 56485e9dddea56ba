"""Line charts as server-rendered SVG: no chart library, nothing for the browser to fetch.

Colours and widths are SVG presentation attributes (never ``style``), so the page's Content
Security Policy can forbid inline styles. Each point carries a ``<title>``: the browser shows
it as a tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

#: Distinct colours for the first agents; the rest are drawn thin and grey (200 agents must
#: stay readable) and summed up in the legend.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
GLOBAL_LABEL = "global"
MUTED = "#c8ccd2"

Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]


@dataclass(frozen=True, slots=True)
class Highlight:
    """A point to mark (the best model): on series ``label`` at ``round``."""

    label: str
    round: int
    value: float
    text: str


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks: list[float] = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(
    series: Series,
    *,
    title: str,
    highlight: Highlight | None = None,
    width: int = 620,
    height: int = 260,
    legend_limit: int = len(PALETTE),
) -> Markup:
    """An SVG chart of ``series`` (label -> (rounds, values)) over rounds; the ``global``
    series is drawn black and thick on top."""
    left, right, top, bottom = 56, 150, 28, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [
        (r, v) for rounds, values in series.values() for r, v in zip(rounds, values, strict=True)
    ]
    parts: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="18" font-size="13" font-weight="600" fill="#1d2430">'
        f"{escape(title)}</text>",
    ]
    if not points:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" '
            'font-size="12" fill="#6b7280">no values recorded</text></svg>'
        )
        return Markup("".join(parts))
    r_lo, r_hi = min(p[0] for p in points), max(p[0] for p in points)
    if r_hi == r_lo:
        r_lo, r_hi = r_lo - 1, r_hi + 1
    y_ticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def x(r: float) -> float:
        return left + (r - r_lo) / (r_hi - r_lo) * plot_w

    def y(v: float) -> float:
        return top + plot_h - (v - y_lo) / ((y_hi - y_lo) or 1.0) * plot_h

    for tick in y_ticks:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'stroke="#e5e7eb" stroke-width="1"/>'
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#4b5563">{_fmt(tick)}</text>'
        )
    step = max(1, math.ceil((r_hi - r_lo) / 10))
    for r in range(math.ceil(r_lo), math.floor(r_hi) + 1, step):
        parts.append(
            f'<text x="{x(r):.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11" '
            f'fill="#4b5563">{r}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" font-size="11" '
        'fill="#4b5563">round</text>'
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#9ca3af" stroke-width="1"/>'
    )
    others = [label for label in series if label != GLOBAL_LABEL]
    colours = {label: PALETTE[i] for i, label in enumerate(others[:legend_limit])}
    muted = others[legend_limit:]
    # Muted series first, then coloured ones, then the global model on top.
    order = muted + others[:legend_limit] + ([GLOBAL_LABEL] if GLOBAL_LABEL in series else [])
    for label in order:
        rounds, values = series[label]
        is_global = label == GLOBAL_LABEL
        colour = "#111827" if is_global else colours.get(label, MUTED)
        width_px = 2.6 if is_global else (1.4 if label in colours else 0.8)
        coords = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in zip(rounds, values, strict=True))
        parts.append(
            f'<g class="series" data-label="{escape(label)}">'
            f'<polyline points="{coords}" fill="none" stroke="{colour}" '
            f'stroke-width="{width_px}" stroke-linejoin="round"/>'
        )
        if is_global or label in colours:
            radius = 3.2 if is_global else 2.2
            for r, v in zip(rounds, values, strict=True):
                parts.append(
                    f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="{radius}" fill="{colour}">'
                    f"<title>{escape(label)}, round {r}: {_fmt(v)}</title></circle>"
                )
        parts.append("</g>")
    if highlight is not None and highlight.label in series:
        hx, hy = x(highlight.round), y(highlight.value)
        parts.append(
            f'<g class="best"><circle cx="{hx:.1f}" cy="{hy:.1f}" r="8" fill="none" '
            f'stroke="#d97706" stroke-width="2.5"><title>{escape(highlight.text)}</title>'
            f'</circle><text x="{hx - 11:.1f}" y="{hy - 9:.1f}" text-anchor="end" '
            f'font-size="11" font-weight="600" fill="#b45309">best</text></g>'
        )
    legend_x, legend_y = left + plot_w + 14, top + 6
    entries = ([GLOBAL_LABEL] if GLOBAL_LABEL in series else []) + others[:legend_limit]
    for i, label in enumerate(entries):
        colour = "#111827" if label == GLOBAL_LABEL else colours[label]
        ly = legend_y + i * 16
        shown = label if len(label) <= 18 else label[:17] + "…"
        parts.append(
            f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="{ly}" y2="{ly}" stroke="{colour}" '
            f'stroke-width="{2.6 if label == GLOBAL_LABEL else 1.6}"/>'
            f'<text x="{legend_x + 22}" y="{ly + 4}" font-size="11" fill="#1d2430">'
            f"{escape(shown)}</text>"
        )
    if muted:
        ly = legend_y + len(entries) * 16
        parts.append(
            f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="{ly}" y2="{ly}" stroke="{MUTED}" '
            'stroke-width="1"/>'
            f'<text x="{legend_x + 22}" y="{ly + 4}" font-size="11" fill="#4b5563">'
            f"+{len(muted)} more agents</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


__all__ = ["GLOBAL_LABEL", "PALETTE", "Highlight", "line_chart", "nice_ticks"]
