"""Metrics DERIVED from sample candles, in signal_service's metric shape (time, instrument, name, value).

These are not signal_service's own numbers: every name starts with `derived.` and every row's `source`
column says which candles it came from, so nobody mistakes them for production metrics. A value needs
its bar's close, so it is stamped with the bar's end (customscripts/bartime.py) and uses bars ending at
or before it only (no lookahead): as-of reads of metrics follow the same rule as candles.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import psycopg

DERIVED_PREFIX = "derived."
WINDOW = 20


def derive(times: Sequence[datetime], close: Sequence[float], volume: Sequence[float],
           window: int = WINDOW) -> list[tuple[datetime, str, float]]:
    """`derived.return_1`, `derived.realized_vol_{w}` (stdev of log returns) and `derived.volume_z_{w}`;
    `times` are the bars' ends (the time each value becomes known)."""
    c = np.asarray(close, dtype=float)
    v = np.asarray(volume, dtype=float)
    out: list[tuple[datetime, str, float]] = []
    if len(c) < 2:
        return out
    simple = c[1:] / c[:-1] - 1.0
    logret = np.log(c[1:] / c[:-1])
    for i, r in enumerate(simple, start=1):
        out.append((times[i], f"{DERIVED_PREFIX}return_1", float(r)))
    if len(logret) >= window:
        vol = np.lib.stride_tricks.sliding_window_view(logret, window).std(axis=1, ddof=1)
        for j, value in enumerate(vol):  # window of returns ending at bar j + window
            out.append((times[j + window], f"{DERIVED_PREFIX}realized_vol_{window}", float(value)))
    if len(v) >= window:
        win = np.lib.stride_tricks.sliding_window_view(v, window)
        mean, std = win.mean(axis=1), win.std(axis=1)
        for j in range(len(win)):  # window of volumes ending at bar j + window - 1
            if std[j] > 0:
                out.append((times[j + window - 1], f"{DERIVED_PREFIX}volume_z_{window}",
                            float((v[j + window - 1] - mean[j]) / std[j])))
    return [row for row in out if np.isfinite(row[2])]


def store(conn: psycopg.Connection, instrument_key: str, rows: Sequence[tuple[datetime, str, float]],
          source: str) -> int:
    """COPY into a temp table, then insert what is new: loading twice leaves the same rows."""
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE metrics_load (LIKE metrics) ON COMMIT DROP")
        copy_sql = "COPY metrics_load (time, instrument_key, name, value, source) FROM STDIN"
        with conn.cursor().copy(copy_sql) as cp:
            for time, name, value in rows:
                cp.write_row((time, instrument_key, name, value, source))
        cur = conn.execute("INSERT INTO metrics SELECT * FROM metrics_load ON CONFLICT DO NOTHING")
        return cur.rowcount


def derive_from_db(conn: psycopg.Connection, instrument_key: str, timeframe: str) -> int:
    """Derive and store metrics for candles already in the database (any instrument, not only samples)."""
    rows = conn.execute("SELECT end_time, close, volume FROM candles WHERE instrument_key = %s "
                        "AND timeframe = %s ORDER BY time", (instrument_key, timeframe)).fetchall()
    if not rows:
        return 0
    times, close, volume = zip(*rows, strict=True)
    return store(conn, instrument_key, derive(times, close, volume), f"derived from candles {timeframe}")
