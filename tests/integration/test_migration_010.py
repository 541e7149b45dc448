"""Migration 010 on data written under the old rule (bars stamped at their start), in a scratch database
of the real local PostgreSQL: candles get their end, derived metrics and script outputs move to their
bar's end, everything else stays; `cs_bar_end` equals bartime.bar_end."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime

import psycopg
import pytest

from customscripts.bartime import bar_end
from customscripts.db import MIGRATIONS_DIR


def ts(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def scratch(stack, uid):
    name = f"cs_mig010_{uid}"
    with psycopg.connect(stack.pg_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    cfg = dataclasses.replace(stack, pg_db=name)
    try:
        with psycopg.connect(cfg.pg_dsn, autocommit=True) as conn:
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.name < "010":
                    with conn.transaction():
                        conn.execute(path.read_text())
            yield conn
    finally:
        with psycopg.connect(stack.pg_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migration_moves_old_stamps_to_bar_ends(scratch):
    conn = scratch
    bars = [("GOOG", "1d", ts(2012, 6, 1)), ("GOOG", "1d", ts(2012, 6, 4)), ("BTC", "1mo", ts(2012, 1, 31)),
            ("EUR", "1h", ts(2017, 4, 19, 9))]
    for instrument, timeframe, start in bars:
        conn.execute("INSERT INTO candles (instrument_key, timeframe, time, open, high, low, close, volume)"
                     " VALUES (%s, %s, %s, 1, 2, 0.5, 1.5, 10)", (instrument, timeframe, start))
    conn.execute("INSERT INTO metrics (time, instrument_key, name, value, source) VALUES"
                 " (%s, 'GOOG', 'derived.return_1', 0.1, 'derived from GOOG.csv (1d candles, backtesting package)'),"
                 " (%s, 'BTC', 'derived.return_1', 0.2, 'derived from candles 1mo'),"
                 " (%s, 'GOOG', 'vendor.pe', 12.0, 'signal_service')",
                 (ts(2012, 6, 4), ts(2012, 1, 31), ts(2012, 6, 4)))
    conn.execute("INSERT INTO script_outputs (time, tenant, instrument_key, timeframe, script_id, version,"
                 " params_hash, value) VALUES (%s, 't', 'GOOG', '1d', 's', 1, 'h', 1.0),"
                 " (%s, 't', 'GOOG', '1d', 's', 1, 'h', 2.0), (%s, 't', 'BTC', '1mo', 's', 1, 'h', 3.0)",
                 (ts(2012, 6, 1), ts(2012, 6, 4), ts(2012, 1, 31)))
    with conn.transaction():
        conn.execute((MIGRATIONS_DIR / "010_bar_end.sql").read_text())
    ends = conn.execute("SELECT instrument_key, time, end_time FROM candles ORDER BY instrument_key, time").fetchall()
    assert ends == [("BTC", ts(2012, 1, 31), ts(2012, 2, 1)), ("EUR", ts(2017, 4, 19, 9), ts(2017, 4, 19, 10)),
                    ("GOOG", ts(2012, 6, 1), ts(2012, 6, 2)), ("GOOG", ts(2012, 6, 4), ts(2012, 6, 5))]
    metrics = conn.execute("SELECT instrument_key, name, time FROM metrics ORDER BY instrument_key, name").fetchall()
    assert metrics == [("BTC", "derived.return_1", ts(2012, 2, 1)), ("GOOG", "derived.return_1", ts(2012, 6, 5)),
                       ("GOOG", "vendor.pe", ts(2012, 6, 4))]  # not derived from our candles: untouched
    outputs = conn.execute("SELECT time, value FROM script_outputs ORDER BY time").fetchall()
    assert outputs == [(ts(2012, 2, 1), 3.0), (ts(2012, 6, 2), 1.0), (ts(2012, 6, 5), 2.0)]
    # writers cannot store another end: the trigger computes it
    conn.execute("INSERT INTO candles (instrument_key, timeframe, time, end_time, open, high, low, close, volume)"
                 " VALUES ('GOOG', '1d', %s, %s, 1, 2, 0.5, 1.5, 10)", (ts(2012, 6, 5), ts(2000, 1, 1)))
    assert conn.execute("SELECT end_time FROM candles WHERE time = %s", (ts(2012, 6, 5),)).fetchone()[0] == \
        ts(2012, 6, 6)


def test_migration_moves_consecutive_and_unknown_stamps_without_losing_a_row(scratch):
    """Consecutive daily bars: one row's new time is the next row's old one (a row-by-row UPDATE under
    the unique key refuses that). A timeframe the rule does not know keeps its time: nothing is lost."""
    conn = scratch
    days = [ts(2011, 1, 4), ts(2011, 1, 5), ts(2011, 1, 6)]
    for day in days:
        conn.execute("INSERT INTO realtime_dead_letters (tenant, user_id, script_id, version, params_hash,"
                     " instrument_key, timeframe, event_time, reason, error, attempts)"
                     " VALUES ('t', 'u', 's', 1, 'h', 'GOOG', '1d', %s, 'invocation_failed', 'x', 1)", (day,))
        conn.execute("INSERT INTO script_outputs (time, tenant, instrument_key, timeframe, script_id, version,"
                     " params_hash, value) VALUES (%s, 't', 'GOOG', '1d', 's', 1, 'h', 1.0)", (day,))
    conn.execute("INSERT INTO script_outputs (time, tenant, instrument_key, timeframe, script_id, version,"
                 " params_hash, value) VALUES (%s, 't', 'GOOG', 'tick', 's', 1, 'h', 9.0)", (days[0],))
    with conn.transaction():
        conn.execute((MIGRATIONS_DIR / "010_bar_end.sql").read_text())
    moved = [ts(2011, 1, 5), ts(2011, 1, 6), ts(2011, 1, 7)]
    assert [r[0] for r in conn.execute("SELECT event_time FROM realtime_dead_letters ORDER BY 1")] == moved
    assert conn.execute("SELECT timeframe, time FROM script_outputs ORDER BY timeframe, time").fetchall() == \
        [("1d", t) for t in moved] + [("tick", days[0])]


def test_sql_bar_end_equals_the_python_rule(stack):
    rng = random.Random(10)
    cases = [(rng.uniform(0, 4.1e9), rng.choice(["1s", "30s", "1m", "15m", "1h", "4h", "1d", "3d", "1w", "2w",
                                                  "1mo", "3mo", "12mo"])) for _ in range(400)]
    cases += [(ts(2024, 2, 29, 23, 59).timestamp(), "1mo"), (ts(2023, 12, 31, 12).timestamp(), "1w"),
              (ts(2024, 1, 1).timestamp(), "1w"), (ts(1999, 12, 31, 23).timestamp(), "1mo")]
    with psycopg.connect(stack.pg_dsn) as conn:
        got = conn.execute("SELECT extract(epoch FROM cs_bar_end(to_timestamp(s), tf))::float8 FROM "
                           "unnest(%s::float8[], %s::text[]) AS k(s, tf)",
                           ([round(s, 6) for s, _ in cases], [tf for _, tf in cases])).fetchall()
    for (start, timeframe), (end,) in zip(cases, got, strict=True):
        assert end == pytest.approx(bar_end(round(start, 6), timeframe), abs=1e-6), (start, timeframe)
