"""Load OHLCV CSVs (header `,Open,High,Low,Close,Volume`) into `candles`, idempotently.

The sample data is real: the daily GOOG 2004-2013, hourly EURUSD and monthly BTCUSD series that ship
inside the `backtesting` package. Rows go through COPY into a temp table and then
`INSERT ... ON CONFLICT DO NOTHING`, so loading twice leaves the same rows and a partial load can be rerun.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from customscripts import ids
from customscripts.bartime import bar_end_dt
from customscripts.config import Settings, settings
from customscripts.marketdata import metrics

# (file inside backtesting/test, instrument_key, timeframe)
SAMPLES: tuple[tuple[str, str, str], ...] = (
    ("GOOG.csv", "GOOG", "1d"),
    ("EURUSD.csv", "EURUSD", "1h"),
    ("BTCUSD.csv", "BTCUSD", "1mo"),
)
EXPECTED_HEADER = ["", "Open", "High", "Low", "Close", "Volume"]


@dataclass(frozen=True)
class CsvRow:
    """One bar as read: the time (UTC) and the CSV's own number strings (PostgreSQL parses them exactly)."""

    time: datetime
    open: str
    high: str
    low: str
    close: str
    volume: str


def sample_csv(name: str) -> Path:
    """Path of a CSV shipped in the `backtesting` package (backtesting/test/<name>)."""
    spec = importlib.util.find_spec("backtesting")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the `backtesting` package is not installed (pip install backtesting)")
    path = Path(spec.origin).parent / "test" / name
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def _parse_time(raw: str) -> datetime:
    parsed = datetime.fromisoformat(raw.strip())
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def read_csv(path: Path) -> list[CsvRow]:
    """Parse and check every row (times ascending and unique, numbers finite) before anything is written."""
    rows: list[CsvRow] = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != EXPECTED_HEADER:
            raise ValueError(f"{path}: expected header {','.join(EXPECTED_HEADER)!r}, got {header!r}")
        for lineno, rec in enumerate(reader, start=2):
            if not rec:
                continue
            try:
                if len(rec) != 6:
                    raise ValueError(f"expected 6 fields, got {len(rec)}")
                row = CsvRow(_parse_time(rec[0]), *(v.strip() for v in rec[1:]))
                for value in rec[1:]:
                    number = float(value)
                    if number != number or number in (float("inf"), float("-inf")):
                        raise ValueError(f"non-finite number {value!r}")
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            if rows and row.time <= rows[-1].time:
                raise ValueError(f"{path}:{lineno}: time {rec[0]!r} not after the previous row")
            rows.append(row)
    return rows


def load_rows(conn: psycopg.Connection, instrument_key: str, timeframe: str, rows: list[CsvRow]) -> int:
    """COPY rows into a temp table and insert the new ones; returns how many were inserted."""
    ids.instrument_key(instrument_key)
    ids.timeframe(timeframe)
    with conn.transaction():
        # the bar's end is not loaded: candles' trigger computes it (migration 010, bartime.bar_end)
        conn.execute("CREATE TEMP TABLE candles_load ON COMMIT DROP AS SELECT instrument_key, timeframe, time,"
                     " open, high, low, close, volume FROM candles WITH NO DATA")
        with conn.cursor().copy(
            "COPY candles_load (instrument_key, timeframe, time, open, high, low, close, volume) FROM STDIN"
        ) as cp:
            for r in rows:
                cp.write_row((instrument_key, timeframe, r.time, r.open, r.high, r.low, r.close, r.volume))
        cur = conn.execute(
            "INSERT INTO candles (instrument_key, timeframe, time, open, high, low, close, volume) "
            "SELECT instrument_key, timeframe, time, open, high, low, close, volume FROM candles_load "
            "ON CONFLICT DO NOTHING")
        return cur.rowcount


def load_csv(path: Path, instrument_key: str, timeframe: str, cfg: Settings | None = None,
             *, with_metrics: bool = True) -> dict[str, int]:
    """Load one CSV (and its derived metrics); returns rows read / candles inserted / metrics inserted."""
    cfg = cfg or settings()
    rows = read_csv(path)
    with psycopg.connect(cfg.pg_dsn, autocommit=True) as conn:
        inserted = load_rows(conn, instrument_key, timeframe, rows)
        derived = 0
        if with_metrics:
            derived = metrics.store(
                conn, instrument_key,
                metrics.derive([bar_end_dt(r.time, timeframe) for r in rows], [float(r.close) for r in rows],
                               [float(r.volume) for r in rows]),
                source=f"derived from {path.name} ({timeframe} candles, backtesting package)")
    return {"rows": len(rows), "candles_inserted": inserted, "metrics_inserted": derived}


def load_sample_data(cfg: Settings | None = None, echo: Callable[[str], None] = print) -> dict:
    """The CLI hook (`customscripts load-data`, `up`, demo): the three sample series + derived metrics."""
    from customscripts.progress import Progress

    cfg = cfg or settings()
    report: dict[str, dict[str, int]] = {}
    with Progress(len(SAMPLES), "[data] loading the sample data") as bar:  # drawn on a terminal only
        for name, instrument_key, timeframe in SAMPLES:
            report[f"{instrument_key}/{timeframe}"] = load_csv(sample_csv(name), instrument_key, timeframe, cfg)
            bar.advance()
    for name, instrument_key, timeframe in SAMPLES:
        result = report[f"{instrument_key}/{timeframe}"]
        echo(f"[data] {instrument_key:7} {timeframe:3} {result['rows']:5} bars from {name}: "
             f"{result['candles_inserted']} new candles, {result['metrics_inserted']} new derived metrics")
    return report
