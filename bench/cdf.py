"""A latency CDF as a small standalone SVG, written by the bench itself.

People compare curves faster than tables, and a plotting library is not a dependency of
the project: this draws the empirical distribution of each series (x: milliseconds on a
log scale, y: fraction of trials at or below) with a few axis labels, nothing more.
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 44
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _x(ms: float, lo: float, hi: float) -> float:
    span = math.log10(hi) - math.log10(lo)
    return LEFT + (math.log10(max(ms, lo)) - math.log10(lo)) / span * (WIDTH - LEFT - RIGHT)


def _y(fraction: float) -> float:
    return TOP + (1 - fraction) * (HEIGHT - TOP - BOTTOM)


def svg(title: str, series: dict[str, list[float]]) -> str:
    """`series`: label -> latencies in seconds. Empty series are left out."""
    series = {k: sorted(v) for k, v in series.items() if v}
    values = [x * 1000 for v in series.values() for x in v]
    lo = 10 ** math.floor(math.log10(max(min(values, default=1.0), 0.1)))
    hi = 10 ** math.ceil(math.log10(max(values, default=10.0) * 1.01))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="18" font-size="14">{escape(title)}</text>',
    ]
    decade = lo
    while decade <= hi:
        for mult in (1, 2, 5):
            tick = decade * mult
            if not lo <= tick <= hi:
                continue
            x = _x(tick, lo, hi)
            parts.append(
                f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" stroke="#ddd"/>'
            )
            label = f"{tick:g}"
            parts.append(
                f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{label}</text>'
            )
        decade *= 10
    for frac in (0.0, 0.5, 0.9, 1.0):
        y = _y(frac)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{frac:g}</text>')
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
        "milliseconds from the etcd put to the first request served (log scale)</text>"
    )
    for i, (label, values_s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        n = len(values_s)
        points = [f"{_x(values_s[0] * 1000, lo, hi):.1f},{_y(0):.1f}"]
        for k, v in enumerate(values_s):
            x = _x(v * 1000, lo, hi)
            points.append(f"{x:.1f},{_y(k / n):.1f}")
            points.append(f"{x:.1f},{_y((k + 1) / n):.1f}")
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{" ".join(points)}"/>'
        )
        y = TOP + 16 + 16 * i
        parts.append(
            f'<line x1="{LEFT + 10}" y1="{y - 4}" x2="{LEFT + 30}" y2="{y - 4}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{LEFT + 36}" y="{y}">{escape(label)} (n={n})</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
