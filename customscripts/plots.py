"""Candles with a script's output over them (or in a pane below), drawn with matplotlib.

Why here: plots are drawn on the trusted side only (the CLI, the demo), from outputs the sandbox or
the API already returned; matplotlib never enters the sandbox and is not on any allowlist. It is a
development dependency (pyproject's `dev` extra), imported only when a plot is asked for.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The PNG every plot writes: FIGSIZE inches at DPI dots per inch (tests check the size).
FIGSIZE = (10.0, 6.0)
DPI = 100
UP, DOWN = "#26a69a", "#ef5350"
LINE_COLORS = ("#1f4e9c", "#e68a00", "#7b3fa0", "#2e7d32", "#8d6e63")

Point = tuple[float, Any]  # (epoch seconds, output value: a number or a dict of numbers)


def numeric_lines(points: Sequence[Point]) -> dict[str, list[tuple[float, float]]]:
    """The plottable lines of a script's outputs: `value` for numbers, one per key for dicts of numbers;
    None, non-finite and non-numeric values are gaps."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for t, value in points:
        items = value.items() if isinstance(value, Mapping) else [("value", value)]
        for key, v in items:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                continue
            lines.setdefault(str(key), []).append((float(t), float(v)))
    return lines


def overlays_price(lines: Mapping[str, list[tuple[float, float]]], low: float, high: float) -> bool:
    """Whether the output lives on the price scale (an SMA) rather than its own (an RSI): its values
    fall inside the price range, widened by half of it."""
    values = [v for pts in lines.values() for _, v in pts]
    if not values:
        return True
    pad = (high - low) * 0.5
    return min(values) >= low - pad and max(values) <= high + pad


def plot_indicator(bars: Mapping[str, Sequence[float]], points: Sequence[Point], out: Path | str, *,
                   title: str = "", pane: str = "auto") -> Path:
    """Write a PNG of `bars` (columns time, open, high, low, close) as candles with the script's
    output drawn over them (`pane="overlay"`), in a pane below (`"below"`), or as fits (`"auto"`)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    times = [_dt(t) for t in bars["time"]]
    o, h, lo, c = (list(map(float, bars[k])) for k in ("open", "high", "low", "close"))
    if not times:
        raise ValueError("no bars to plot")
    lines = numeric_lines(points)
    below = pane == "below" or (pane == "auto" and not overlays_price(lines, min(lo), max(h)))
    if below:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=FIGSIZE, dpi=DPI, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        ax2 = ax
    xs = mdates.date2num(times)
    width = (min(b - a for a, b in itertools.pairwise(xs)) if len(xs) > 1 else 1.0) * 0.7
    colors = [UP if cl >= op else DOWN for op, cl in zip(o, c, strict=True)]
    ax.vlines(xs, lo, h, colors=colors, linewidth=0.8)
    ax.bar(xs, [abs(cl - op) or (max(h) - min(lo)) * 0.002 for op, cl in zip(o, c, strict=True)],
           bottom=[min(op, cl) for op, cl in zip(o, c, strict=True)], width=width, color=colors, edgecolor=colors)
    for i, (name, pts) in enumerate(sorted(lines.items())):
        ax2.plot(mdates.date2num([_dt(t) for t, _ in pts]), [v for _, v in pts], color=LINE_COLORS[i % 5],
                 linewidth=1.6, label=name)
    if lines:
        ax2.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.25)
    if below:
        ax2.grid(alpha=0.25)
    ax2.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(float(epoch), UTC)


def points_from_series(result: Mapping[str, Any]) -> list[Point]:
    """(time, value) pairs from a series answer: a list of indicator-shaped outputs (`outputs`, `items`
    or `series`), or columns `timestamp`/`value`."""
    for key in ("outputs", "items", "series", "values"):
        rows = result.get(key)
        if isinstance(rows, list):
            return [(float(r["timestamp"]), r.get("value")) for r in rows
                    if isinstance(r, Mapping) and r.get("timestamp") is not None]
        if isinstance(rows, Mapping):
            return points_from_series(rows)
    times = result.get("timestamp") or result.get("time")
    if isinstance(times, list):
        return list(zip(map(float, times), result.get("value") or [], strict=False))
    return []


def sample_window(instrument_key: str, timeframe: str, end: float,
                  bars: int) -> tuple[dict[str, list[float]], list[float]]:
    """The last `bars` sample bars visible as of `end`, and the as-of time of each (the moment it became
    visible: its end where the data gives one, else its time)."""
    from customscripts.sandbox import SampleDataSource

    cols = SampleDataSource().get_market_data(instrument_key, timeframe, limit=max(bars, 2), end=end)["columns"]
    return cols, list(cols.get("end_time") or cols["time"])


def sample_bars(instrument_key: str, timeframe: str | None, times: Iterable[float]) -> dict[str, list[float]]:
    """The sample data's bars from the first to the last of `times` (the local data the CLI runs on)."""
    from customscripts.sandbox import SampleDataSource

    wanted = sorted(times)
    data = SampleDataSource()
    full = data.get_market_data(instrument_key, timeframe or data.instruments()[instrument_key])["columns"]
    keep = [i for i, t in enumerate(full["time"]) if wanted and wanted[0] - _span(full) <= t <= wanted[-1]]
    return {k: [full[k][i] for i in keep] for k in ("time", "open", "high", "low", "close")}


def _span(cols: Mapping[str, Sequence[float]]) -> float:
    t = cols["time"]
    return float(t[1] - t[0]) if len(t) > 1 else 0.0


def bars_for(instrument_key: str, timeframe: str, points: Sequence[Point]) -> dict[str, list[float]]:
    """Bars under a series' points: from the sample data (what the local stack loads)."""
    return sample_bars(instrument_key, timeframe, [t for t, _ in points])
