"""Look-ahead inside a bar: a bar is visible only from its end (start + timeframe; weeks and months end
where the calendar says). Before the rule every as-of read compared the bar's *start*, so a one-time
execute as of 2012-06-01T12:00Z saw that day's close (570.98), a price that exists only at its end.

The attack is performed over every real read path, at as-of times chosen anywhere inside bars of each
sample series (daily GOOG, hourly EURUSD, monthly BTCUSD labelled at its month's end): one-time executes
through registry-fn and the script function, gateway-fn's market, metric and script-output reads
(JSON and float64 columns, explicit `end` past the as-of), series runs, realtime events through
JetStream and the scheduler, and the sample data source of `customscripts run`."""

from __future__ import annotations

import random
from array import array
from datetime import UTC, datetime

import psycopg
import pytest
import requests

from customscripts.bartime import bar_end
from customscripts.gateway.tokens import mint_execution_token
from customscripts.marketdata.replayer import replay
from customscripts.outputs import OutputRow, OutputStore, params_hash
from customscripts.sandbox import SampleDataSource
from customscripts.sandbox.protocol import COLUMNS_MEDIA_TYPE, split_binary
from tests.integration.realtime_support import delete_stream, drop_subscriptions, isolated, rows, run_scheduler
from tests.integration.realtime_support import subscribe as subscribe_realtime
from tests.integration.registry_support import Caller

JUNE_1 = datetime(2012, 6, 1, tzinfo=UTC).timestamp()
JUNE_1_CLOSE, MAY_31_CLOSE = 570.98, 580.86
SERIES = (("GOOG", "1d"), ("EURUSD", "1h"), ("BTCUSD", "1mo"))
PEEK = """
def run(ctx):
    bars = get_market_data(limit=5, end=ctx.timestamp + 10**9)   # asks past its as-of on purpose
    later = get_market_data(start=ctx.timestamp - 1, end=ctx.timestamp + 10**9, limit=5)
    ends = list(bars.end) + list(later.end_time)
    return {"value": float(bars.close[-1]),
            "metadata": {"end": float(max(ends)), "start": float(bars.start[-1]), "n": len(ends)}}
"""


def candles(cfg, instrument: str, timeframe: str) -> list[tuple[float, float, float]]:
    """(start, end, close) of every stored bar, in time order."""
    with psycopg.connect(cfg.pg_dsn) as conn:
        return conn.execute("SELECT extract(epoch FROM time)::float8, extract(epoch FROM end_time)::float8, close"
                            " FROM candles WHERE instrument_key = %s AND timeframe = %s ORDER BY time",
                            (instrument, timeframe)).fetchall()


def inside_bars(bars: list[tuple[float, float, float]], rng: random.Random, n: int) -> list[tuple[float, int]]:
    """n as-of times strictly inside bars (from just after the start to just before the end), with the
    index of the newest bar that has closed by then."""
    picks = []
    for _ in range(n):
        i = rng.randrange(min(300, len(bars) // 2), len(bars) - 1)
        start, end, _close = bars[i]
        picks.append((rng.choice([start, start + 1e-6, (start + end) / 2, end - 1e-3, end - 1e-6]), i - 1))
    return picks


@pytest.fixture
def mallory(api, uid, stack):
    caller = Caller(api, f"mallory-{uid}", f"tenant-{uid}")
    yield caller
    drop_subscriptions(stack, caller.tenant)


def test_one_time_execute_never_sees_a_bar_before_its_end(mallory, uid, stack):
    sid = mallory.sid(f"peek-{uid}")
    mallory.create_published(sid, PEEK)

    def execute(instrument: str, timeframe: str, t: float) -> dict:
        body = mallory.call("POST", f"/scripts/{sid}/execute", {"instrument_key": instrument, "timeframe": timeframe,
                                                                "timestamp": t}).json()
        assert body["status"] == "ok", body
        return body["output"]

    # the example: as of noon (or midnight) on 2012-06-01 that day's close does not exist yet
    for t in (JUNE_1, JUNE_1 + 12 * 3600, JUNE_1 + 86400 - 1e-6):
        out = execute("GOOG", "1d", t)
        assert out["value"] == MAY_31_CLOSE and out["metadata"]["end"] <= t, t
    assert execute("GOOG", "1d", JUNE_1 + 86400)["value"] == JUNE_1_CLOSE  # at its end it does
    rng = random.Random(14)
    for instrument, timeframe in SERIES:
        bars = candles(stack, instrument, timeframe)
        for t, closed in inside_bars(bars, rng, 4):
            out = execute(instrument, timeframe, t)
            assert out["value"] == bars[closed][2] and out["metadata"]["end"] == bars[closed][1], (instrument, t)


def _get(cfg, path: str, token: str, columns: bool = False, **params) -> dict:
    headers = {"Authorization": f"Bearer {token}"} | ({"Accept": COLUMNS_MEDIA_TYPE} if columns else {})
    resp = requests.get(cfg.data_gateway_url + path, params=params, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    if not columns:
        return resp.json()["columns"] if "columns" in resp.json() else resp.json()
    head, blob = split_binary(bytearray(resp.content))
    out, offset = {}, 0
    for name, n in head["f64"]:
        out[name] = array("d", bytes(blob[offset:offset + 8 * n])).tolist()
        offset += 8 * n
    return out


def test_gateway_reads_never_return_a_bar_or_value_before_its_end(stack, uid):
    """gateway-fn (its own Service address, as script functions reach it): market and metric reads,
    JSON and columns, with `end` far past the as-of; script outputs stamped at bar ends."""
    rng = random.Random(15)
    tenant, script = f"t-{uid}", f"dep-{uid}"
    for instrument, timeframe in SERIES:
        bars = candles(stack, instrument, timeframe)
        for t, closed in inside_bars(bars, rng, 3):
            token = mint_execution_token(user=f"u-{uid}", tenant=tenant, script_id=f"me-{uid}", version=1,
                                         deps=[], as_of=t, tier="pro")
            for columns in (False, True):
                got = _get(stack, "/data/market", token, columns, instrument_key=instrument, timeframe=timeframe,
                           limit=3, end=t + 10**9)
                assert got["end_time"][-1] == bars[closed][1] and got["close"][-1] == bars[closed][2]
                assert got["time"][-1] == bars[closed][0]
                metric = _get(stack, "/data/metrics", token, columns, instrument_key=instrument,
                              name="derived.return_1", limit=1, end=t + 10**9)
                assert metric["time"] == [bars[closed][1]]  # derived from the newest closed bar: at its end
    # outputs are stamped with their bar's end: one stamped t is invisible a microsecond before t
    from customscripts import db

    end = bar_end(JUNE_1, "1d")
    OutputStore(db.pool(stack.pg_dsn)).write_many([OutputRow(
        time=end, tenant=tenant, instrument_key="GOOG", timeframe="1d", script_id=script, version=1,
        params_hash=params_hash({}), value=1.0)])
    for as_of, expected in ((end - 1e-6, []), (end, [end])):
        token = mint_execution_token(user=f"u-{uid}", tenant=tenant, script_id=f"me-{uid}", version=1,
                                     deps=[f"{script}@1"], as_of=as_of, tier="pro")
        hist = _get(stack, f"/data/scripts/{script}/history", token, instrument_key="GOOG", timeframe="1d",
                    end=as_of + 10**9)
        assert hist["time"] == expected


def test_series_outputs_sit_at_bar_ends_and_see_only_closed_bars(mallory, uid, stack):
    sid = mallory.sid(f"peek-{uid}")
    mallory.create_published(sid, PEEK)
    for instrument, timeframe in SERIES:
        bars = candles(stack, instrument, timeframe)[100:112]
        body = mallory.call("POST", f"/scripts/{sid}/series", {
            "instrument_key": instrument, "timeframe": timeframe,
            "start": bars[0][0] + 1e-6, "end": bars[-1][1] - 1e-6}).json()
        # the first bar ends inside the range, the last one after it: 11 bar ends, each its own bar
        assert [p["timestamp"] for p in body["outputs"]] == [b[1] for b in bars[:-1]], body
        for point, (start, end, close) in zip(body["outputs"], bars, strict=False):
            assert point["value"] == close and point["metadata"]["end"] == end and point["metadata"]["start"] == start


def test_realtime_events_run_at_the_bar_end_and_see_nothing_later(mallory, uid, stack):
    rt = isolated(stack, uid)
    sid = mallory.sid(f"peek-{uid}")
    mallory.create_published(sid, PEEK)
    assert subscribe_realtime(mallory, sid).status_code == 201
    bars = [b for b in candles(stack, "GOOG", "1d") if b[1] >= JUNE_1][:6]
    try:
        result = replay("GOOG", "1d", start=bars[0][1], limit=6, cfg=rt)
        run_scheduler(rt, result.published)
    finally:
        delete_stream(rt)
    stored = {t: float(v) for t, _i, _p, v in rows(stack, mallory.tenant, sid)}
    assert stored == {end: close for _start, end, close in bars}  # stamped at the bar's end, its own close


def test_sample_data_source_hides_bars_until_their_end():
    data = SampleDataSource()
    rng = random.Random(16)
    for instrument, timeframe in SERIES:
        full = data.get_market_data(instrument, timeframe)["columns"]
        bars = list(zip(full["time"], full["end_time"], full["close"], strict=True))
        for t, closed in inside_bars(bars, rng, 20):
            got = data.get_market_data(instrument, timeframe, limit=2, end=t)["columns"]
            assert got["end_time"][-1] == bars[closed][1] and got["close"][-1] == bars[closed][2]
        assert data.latest_time(instrument) == bars[-1][1]
