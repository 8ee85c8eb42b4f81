"""Line charts as inline SVG, drawn here: no plotting library, nothing fetched when the page
opens (tasks/run_report.py embeds them). Axes with rounded ticks (a log axis when the values
span more than 20x), grid lines, a legend with each series' last value; series longer than
MAX_POINTS are reduced per bucket to their min and max, so spikes survive.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_POINTS = 1500          # per polyline; longer series are reduced to per-bucket min/max


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def fmt(v: Any) -> str:
    """A number for a person: 4 significant digits, integers as integers."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "–"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) < 1e6:
            return f"{int(v):,}"
        return f"{v:.4g}"
    return str(v)


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    color: str | None = None
    dashed: bool = False
    points: list[tuple[float, float]] = field(default_factory=list, repr=False)


def nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def linear_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """A domain widened to round numbers and the ticks in it."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    lo2, hi2 = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = int(round((hi2 - lo2) / step))
    return lo2, hi2, [lo2 + i * step for i in range(n + 1)]


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """A log10 domain (in exponents) and the ticks (values) in it."""
    a, b = math.log10(lo), math.log10(hi)
    pad = (b - a) * 0.04 or 0.1
    a, b = a - pad, b + pad
    for mults in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10 ** e for e in range(math.floor(a), math.ceil(b) + 1) for m in mults
                 if a <= math.log10(m * 10 ** e) <= b]
        if len(ticks) >= 3:
            break
    if len(ticks) > 10:
        ticks = ticks[::math.ceil(len(ticks) / 8)]
    return a, b, ticks


def tick_label(v: float, step_axis: bool = False) -> str:
    if step_axis:
        if abs(v) >= 1000:
            s = f"{v / 1000:.1f}".rstrip("0").rstrip(".")
            return f"{s}k"
        return f"{v:g}"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.3g}"


def reduce_points(xs: list[float], ys: list[float], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ~limit points: each bucket keeps its min and max (in step order), so spikes survive."""
    pts = sorted(zip(xs, ys))
    if len(pts) <= limit:
        return pts
    size = math.ceil(len(pts) / (limit // 2))
    out = []
    for i in range(0, len(pts), size):
        bucket = pts[i:i + size]
        lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out.extend(sorted({lo, hi}))
    if out[-1] != pts[-1]:
        out.append(pts[-1])
    return out


def svg_chart(title: str, series: Iterable[Series], *, y_label: str = "", x_label: str = "step",
              log_y: bool | None = None, width: int = 600, height: int = 300) -> str:
    """An inline SVG line chart: axes, ticks, labels, one polyline per series, a legend.
    log_y None: a log axis when every value is positive and they span more than 20x."""
    series = [s for s in series if s.xs]
    if not series:
        return note(f"{title}: no data yet.")
    for i, s in enumerate(series):
        s.color = s.color or PALETTE[i % len(PALETTE)]
    all_y = [y for s in series for y in s.ys]
    if log_y is None:
        log_y = min(all_y) > 0 and max(all_y) / min(all_y) > 20
    if log_y:
        for s in series:
            s.points = reduce_points(*zip(*[(x, y) for x, y in zip(s.xs, s.ys) if y > 0])) if any(
                y > 0 for y in s.ys) else []
    else:
        for s in series:
            s.points = reduce_points(s.xs, s.ys)
    series = [s for s in series if s.points]
    if not series:
        return note(f"{title}: no positive values to draw on a log axis.")

    # legend rows, laid out in the space above the plot
    char_w, left, right, bottom = 6.6, (66 if width >= 400 else 50), 18, 44
    rows: list[list[tuple[Series, str, float]]] = [[]]
    row_w = 0.0
    for s in series:
        label = f"{s.name}  {tick_label(s.points[-1][1])}"
        w = 26 + len(label) * char_w + 16
        if rows[-1] and row_w + w > width - left - right:
            rows.append([])
            row_w = 0.0
        rows[-1].append((s, label, row_w))
        row_w += w
    top = 34 + 18 * len(rows) + 6
    pw, ph = width - left - right, height - top - bottom

    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points]
    x0, x1, xticks = linear_ticks(min(xs), max(xs), 6)
    if min(xs) >= 0 > x0:
        x0 = 0.0
    if log_y:
        y0, y1, yticks = log_ticks(min(ys), max(ys))
        ty = math.log10
    else:
        y0, y1, yticks = linear_ticks(min(ys), max(ys), 5)
        ty = float

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (ty(y) - y0) / (y1 - y0) * ph

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{esc(title)}">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text class="ct" x="{left}" y="22">{esc(title)}</text>']
    for r, row in enumerate(rows):
        ly = 34 + 18 * r + 9
        for s, label, off in row:
            lx = left + off
            dash = ' stroke-dasharray="5 3"' if s.dashed else ""
            out.append(f'<line x1="{lx:.1f}" y1="{ly}" x2="{lx + 20:.1f}" y2="{ly}" stroke="{s.color}" '
                       f'stroke-width="2.5"{dash}/><text class="lg" x="{lx + 26:.1f}" y="{ly + 4}">{esc(label)}</text>')
    # grid and ticks
    for t in yticks:
        y = py(t)
        out.append(f'<line class="gr" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"/>'
                   f'<text class="tk" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(tick_label(t))}</text>')
    for t in xticks:
        if not x0 <= t <= x1:
            continue
        x = px(t)
        out.append(f'<line class="gr" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}"/>'
                   f'<text class="tk" x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">'
                   f'{esc(tick_label(t, step_axis=True))}</text>')
    out.append(f'<line class="ax" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>'
               f'<line class="ax" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>'
               f'<text class="al" x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{esc(x_label)}</text>')
    if y_label or log_y:
        yl = f"{y_label} (log)" if log_y else y_label
        out.append(f'<text class="al" transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{esc(yl.strip())}</text>')
    # data
    for s in series:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<polyline fill="none" stroke="{s.color}" stroke-width="2" stroke-linejoin="round" '
                   f'stroke-linecap="round"{dash} points="{pts}"><title>{esc(s.name)}</title></polyline>')
        if len(s.points) <= 40:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{s.color}">'
                       f'<title>{esc(s.name)} @ {fmt(x)}: {fmt(y)}</title></circle>' for x, y in s.points)
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------- page sections
