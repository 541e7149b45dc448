"""Sample data: the GOOG daily candles in PostgreSQL equal the CSV row for row; loading is idempotent."""

from __future__ import annotations

import csv
from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest

from customscripts.marketdata import metrics
from customscripts.marketdata.loader import SAMPLES, load_csv, load_sample_data, read_csv, sample_csv


def _count(cfg, instrument: str, timeframe: str) -> int:
    with psycopg.connect(cfg.pg_dsn) as conn:
        return conn.execute("SELECT count(*) FROM candles WHERE instrument_key = %s AND timeframe = %s",
                            (instrument, timeframe)).fetchone()[0]


def test_goog_daily_candles_equal_the_csv_row_for_row(stack):
    load_sample_data(stack, echo=lambda _m: None)
    with open(sample_csv("GOOG.csv"), newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        expected = [(datetime.fromisoformat(r[0]).replace(tzinfo=UTC), *map(float, r[1:])) for r in reader]
    with psycopg.connect(stack.pg_dsn) as conn:
        actual = conn.execute("SELECT time, open, high, low, close, volume FROM candles "
                              "WHERE instrument_key = 'GOOG' AND timeframe = '1d' ORDER BY time").fetchall()
    assert len(expected) == 2148
    assert actual == expected


def test_loading_the_samples_twice_changes_nothing(stack):
    load_sample_data(stack, echo=lambda _m: None)
    before = {(i, t): _count(stack, i, t) for _, i, t in SAMPLES}
    report = load_sample_data(stack, echo=lambda _m: None)
    assert all(r["candles_inserted"] == 0 and r["metrics_inserted"] == 0 for r in report.values())
    assert {(i, t): _count(stack, i, t) for _, i, t in SAMPLES} == before
    assert before == {("GOOG", "1d"): 2148, ("EURUSD", "1h"): 5000, ("BTCUSD", "1mo"): 156}


def test_any_csv_of_that_shape_loads_idempotently(stack, uid, tmp_path):
    path = tmp_path / "bars.csv"
    lines = [f"2024-01-01 {h:02d}:00:00,{10 + h},{11 + h},{9 + h},{10.5 + h},{100 * (h + 1)}\n"
             for h in range(24)]
    path.write_text(",Open,High,Low,Close,Volume\n" + "".join(lines))
    first = load_csv(path, f"X{uid}", "1h", stack)
    second = load_csv(path, f"X{uid}", "1h", stack)
    assert (first["candles_inserted"], second["candles_inserted"], second["metrics_inserted"]) == (24, 0, 0)
    assert first["metrics_inserted"] > 0 and _count(stack, f"X{uid}", "1h") == 24


def test_bad_csv_is_rejected_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(",Open,High,Low,Close,Volume\n2024-01-02,1,2,0.5,1.5,10\n2024-01-01,1,2,0.5,1.5,10\n")
    with pytest.raises(ValueError, match=r"bad.csv:3"):
        read_csv(bad)
    bad.write_text("Date,Open,High,Low,Close\n")
    with pytest.raises(ValueError, match="expected header"):
        read_csv(bad)


def test_derived_metrics_are_labelled_and_use_no_future_bars(stack):
    rows = read_csv(sample_csv("GOOG.csv"))
    times = [r.time for r in rows]
    close = [float(r.close) for r in rows]
    volume = [float(r.volume) for r in rows]
    full = {(t, n): v for t, n, v in metrics.derive(times, close, volume)}
    cut = 500  # recomputing on a prefix gives the same values: nothing at t looks past t
    prefix = metrics.derive(times[:cut], close[:cut], volume[:cut])
    assert prefix and all(np.isclose(full[(t, n)], v) for t, n, v in prefix)
    assert {n for _, n in full} == {"derived.return_1", "derived.realized_vol_20", "derived.volume_z_20"}
    with psycopg.connect(stack.pg_dsn) as conn:
        sources = conn.execute("SELECT DISTINCT name, source FROM metrics "
                               "WHERE instrument_key = 'GOOG'").fetchall()
    assert sources and all(n.startswith("derived.") and "derived from GOOG.csv" in s for n, s in sources)
