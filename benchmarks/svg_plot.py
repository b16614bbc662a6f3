"""A labelled scatter plot written as a standalone SVG file (what the benchmarks need from a plotting library, without
one: matplotlib is not a dependency). Linear or log10 axes, ticks at "nice" values, one labelled point per entry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

W, H = 720, 460                    # canvas (px)
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 50, 60  # margins around the plot area
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


@dataclass
class Point:
    x: float
    y: float
    label: str


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About `count` round values (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    if hi - lo < 1e-12:  # one point (or all equal): a unit-wide range around it
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def scatter(points: list[Point], path: Path, *, title: str, xlabel: str, ylabel: str, log_y: bool = False) -> None:
    """Write `points` as an SVG scatter plot to `path` (log_y: a log10 y axis; every y must then be > 0)."""
    if log_y and any(p.y <= 0 for p in points):
        raise ValueError("a log axis needs every y > 0: " + ", ".join(p.label for p in points if p.y <= 0))
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p.x for p in points], [ty(p.y) for p in points]
    xticks = _nice_ticks(min(xs), max(xs))
    if log_y:  # decades, widened to whole powers of ten around the data
        yticks = list(range(math.floor(min(ys)), math.ceil(max(ys)) + 1))
    else:
        yticks = _nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
    if y1 == y0:
        y1 = y0 + 1

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(y: float) -> float:  # y already on the axis' scale
        return H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for t in xticks:
        out.append(f'<line x1="{px(t):.1f}" y1="{TOP}" x2="{px(t):.1f}" y2="{H - BOTTOM}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{px(t):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{_fmt(t)}</text>')
    for t in yticks:
        label = _fmt(10 ** t) if log_y else _fmt(t)
        out.append(f'<line x1="{LEFT}" y1="{py(t):.1f}" x2="{W - RIGHT}" y2="{py(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{LEFT - 8}" y="{py(t) + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" '
               'stroke="#333"/>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 18}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(20 {(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    for i, (p, y) in enumerate(zip(points, ys)):
        color = COLORS[i % len(COLORS)]
        anchor, dx = ("end", -9) if px(p.x) > W - RIGHT - 150 else ("start", 9)  # keep labels inside the canvas
        out.append(f'<circle cx="{px(p.x):.1f}" cy="{py(y):.1f}" r="5" fill="{color}"/>')
        out.append(f'<text x="{px(p.x) + dx:.1f}" y="{py(y) + 4:.1f}" text-anchor="{anchor}" fill="{color}">'
                   f'{escape(p.label)}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(out) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a plot
