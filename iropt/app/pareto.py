"""The Pareto front of (cost, quality) points and its plot as a standalone SVG file.

Cost is minimized (latency, bytes, nodes), quality maximized (cosine, SNR, top-1; an error
metric such as max_abs is negated by the caller). A point is on the front when no other point
is at least as good on both and better on one. The plot needs no plotting library: it is a
few dozen SVG elements, readable in any browser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path


@dataclass(frozen=True)
class Point:
    """One trial: its cost, its quality, whether it met the constraint, and a label."""

    cost: float
    quality: float
    feasible: bool
    label: str


def dominates(a: Point, b: Point) -> bool:
    return a.cost <= b.cost and a.quality >= b.quality and (a.cost < b.cost or a.quality > b.quality)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points, by increasing cost (duplicates of a front point kept once)."""
    front: list[Point] = []
    for point in sorted(points, key=lambda p: (p.cost, -p.quality)):
        if any(dominates(other, point) for other in front):
            continue
        if front and front[-1].cost == point.cost and front[-1].quality == point.quality:
            continue
        front.append(point)
    return front


# --- the plot ---------------------------------------------------------------------------

WIDTH, HEIGHT = 640, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50
TICKS = 5


@dataclass(frozen=True)
class _Scale:
    low: float
    high: float
    start: float
    stop: float

    def __call__(self, value: float) -> float:
        span = self.high - self.low or 1.0
        return self.start + (value - self.low) / span * (self.stop - self.start)

    def ticks(self) -> list[float]:
        return [self.low + (self.high - self.low) * i / (TICKS - 1) for i in range(TICKS)]


def _padded(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def write_svg(points: Sequence[Point], path: Path, *, cost_label: str, quality_label: str,
              threshold: float | None = None, best: Point | None = None) -> Path:
    """Scatter of every point (hollow when infeasible), the front as a line, the threshold dashed."""
    finite = [p for p in points if math.isfinite(p.cost) and math.isfinite(p.quality)]
    qualities = [p.quality for p in finite] + ([threshold] if threshold is not None else [])
    x = _Scale(*_padded([p.cost for p in finite] or [0.0, 1.0]), LEFT, WIDTH - RIGHT)
    y = _Scale(*_padded(qualities or [0.0, 1.0]), HEIGHT - BOTTOM, TOP)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">'
        f"{escape(quality_label)} against {escape(cost_label)}: {len(finite)} trials</text>",
        *_axes(x, y, cost_label, quality_label),
    ]
    if threshold is not None:
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                     'stroke="#888" stroke-dasharray="4 3"/>')
    front = pareto_front(finite)
    if len(front) > 1:
        path_points = " ".join(f"{x(p.cost):.1f},{y(p.quality):.1f}" for p in front)
        parts.append(f'<polyline points="{path_points}" fill="none" stroke="#c33" stroke-width="1.5"/>')
    on_front = set(front)
    for p in finite:
        color = "#c33" if p in on_front else "#36c"
        fill = color if p.feasible else "none"
        parts.append(f'<circle cx="{x(p.cost):.1f}" cy="{y(p.quality):.1f}" r="4" stroke="{color}" '
                     f'fill="{fill}"><title>{escape(p.label)}</title></circle>')
    if best is not None and math.isfinite(best.cost) and math.isfinite(best.quality):
        parts.append(f'<circle cx="{x(best.cost):.1f}" cy="{y(best.quality):.1f}" r="8" stroke="black" '
                     'fill="none"/>')
        parts.append(f'<text x="{x(best.cost) + 10:.1f}" y="{y(best.quality) - 8:.1f}">best</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def _axes(x: _Scale, y: _Scale, cost_label: str, quality_label: str) -> list[str]:
    bottom, left = HEIGHT - BOTTOM, LEFT
    parts = [
        f'<line x1="{left}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{TOP}" x2="{left}" y2="{bottom}" stroke="black"/>',
        f'<text x="{(left + WIDTH - RIGHT) / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(cost_label)}</text>',
        f'<text transform="translate(16 {(TOP + bottom) / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(quality_label)}</text>",
    ]
    for value in x.ticks():
        parts.append(f'<text x="{x(value):.1f}" y="{bottom + 16}" text-anchor="middle">{value:.4g}</text>')
    for value in y.ticks():
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.5g}</text>')
    return parts
