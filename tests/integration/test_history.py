"""History on the real stack: series runs equal one-time executes at every bar end (example scripts,
GOOG and EURUSD, a dependency included), paging and caps, and backfill on subscribe that answers
`history=N` at once and publishes each event once even while live events arrive."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

import customscripts
from customscripts.marketdata.loader import CsvRow, load_rows
from customscripts.marketdata.replayer import replay
from customscripts.outputs import params_hash
from tests.integration.realtime_support import (
    delete_stream,
    drop_subscriptions,
    isolated,
    rows,
    run_scheduler,
    stream_counts,
    subscribe,
)
from tests.integration.registry_support import Caller, error_code
from tests.waiting import wait_until

EXAMPLES = Path(customscripts.__file__).parent / "examples"
LAST = """
def run(ctx):
    bars = get_market_data(limit=3)
    return {"value": float(bars.close[-1]), "metadata": {"start": float(bars.start[-1]), "end": float(bars.end[-1])}}
"""


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


@pytest.fixture
def alice(api, uid, stack):
    caller = Caller(api, f"alice-{uid}", f"tenant-{uid}")
    yield caller
    drop_subscriptions(stack, caller.tenant)


def bar_ends(cfg, instrument: str, timeframe: str, *, last: int, skip: int = 0) -> list[float]:
    """`last` consecutive bar ends, ending `skip` bars before the newest."""
    with psycopg.connect(cfg.pg_dsn) as conn:
        found = conn.execute("SELECT extract(epoch FROM end_time)::float8 FROM candles WHERE instrument_key = %s"
                             " AND timeframe = %s ORDER BY end_time DESC LIMIT %s",
                             (instrument, timeframe, last + skip)).fetchall()
    return sorted(r[0] for r in found)[:last]


def series(caller: Caller, script_id: str, instrument: str = "GOOG", timeframe: str = "1d", **body):
    return caller.call("POST", f"/scripts/{script_id}/series",
                       {"instrument_key": instrument, "timeframe": timeframe, **body})


def one_time(caller: Caller, script_id: str, instrument: str, timeframe: str, params: dict, t: float) -> dict:
    body = caller.call("POST", f"/scripts/{script_id}/execute", {
        "instrument_key": instrument, "timeframe": timeframe, "params": params, "timestamp": t}).json()
    assert body["status"] == "ok", body
    return body["output"]


def assert_equals_one_time(caller, sid, instrument, timeframe, params, outputs) -> None:
    for point in outputs:
        assert point["status"] == "ok", point
        expected = one_time(caller, sid, instrument, timeframe, params, point["timestamp"])
        assert expected == {"value": point["value"], "timestamp": point["timestamp"],
                            "metadata": point["metadata"]}, point["timestamp"]


@pytest.mark.parametrize(("instrument", "timeframe", "skip"), [("GOOG", "1d", 300), ("EURUSD", "1h", 1000)])
def test_series_equals_one_time_executes_at_every_bar(alice, uid, stack, instrument, timeframe, skip):
    """Every output of a series is what a one-time execute as of that bar end answers (the bar visible
    from its end, the same value, metadata and timestamp), for the example scripts."""
    ends = bar_ends(stack, instrument, timeframe, last=25, skip=skip)
    for name, params in (("rsi.py", {"period": 14}), ("sma.py", {"period": 20})):
        sid = alice.sid(f"{name[:-3]}-{uid}")
        alice.create_published(sid, example(name))
        resp = series(alice, sid, instrument, timeframe, params=params, start=ends[0], end=ends[-1])
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert [p["timestamp"] for p in body["outputs"]] == ends
        assert body["statuses"] == {"ok": 25} and body["next_start"] is None
        assert body["params_hash"] == params_hash(params) and body["version"] == 1
        assert_equals_one_time(alice, sid, instrument, timeframe, params, body["outputs"])
    # nothing was published: the realtime publish stays the value of record
    assert rows(stack, alice.tenant, alice.sid(f"rsi-{uid}")) == []


def test_series_of_a_dependent_evaluates_its_dependency_at_each_bar_end(alice, uid, stack):
    """rsi_regime reads the RSI script's output: the series evaluates RSI at each bar end first, exactly
    as realtime does; one-time executes (which read RSI's published history, backfilled here) agree."""
    rsi, regime = alice.sid(f"rsi-{uid}"), alice.sid(f"regime-{uid}")
    alice.create_published(rsi, example("rsi.py"))
    alice.create_published(regime, example("rsi_regime.py"), depends_on=[f"{rsi}@1"])
    ends = bar_ends(stack, "GOOG", "1d", last=20)
    params = {"rsi_script": rsi}
    body = series(alice, regime, params=params, start=ends[0], end=ends[-1]).json()
    assert [p["timestamp"] for p in body["outputs"]] == ends and body["statuses"] == {"ok": 20}, body
    # a subscription to RSI backfills its history over the same bar ends, for the one-time executes
    sub = subscribe(alice, rsi, backfill=20)
    assert sub.status_code == 201 and sub.json()["backfill"]["bars"] == 20, sub.text
    history = {t: float(v) for t, _i, _p, v in rows(stack, alice.tenant, rsi)}
    assert sorted(history) == ends
    for point in body["outputs"]:
        assert point["value"] == pytest.approx(history[point["timestamp"]] - 50.0, abs=0)
    assert_equals_one_time(alice, regime, "GOOG", "1d", params, body["outputs"])


def test_series_pages_at_the_tiers_cap(alice, uid, stack):
    from customscripts.app import app
    from customscripts.auth import decode_token

    sid = alice.sid(f"last-{uid}")
    alice.create_published(sid, LAST)
    ends = bar_ends(stack, "GOOG", "1d", last=10, skip=50)
    history = app().history
    tiers = {**stack.tiers, "pro": dataclasses.replace(stack.tiers["pro"], max_series_bars=7)}
    capped = dataclasses.replace(stack, tiers=tiers)
    saved = history.cfg
    history.cfg = capped
    try:
        principal = decode_token(alice.token)
        first = history.series(principal, sid, {"instrument_key": "GOOG", "timeframe": "1d",
                                                "start": ends[0], "end": ends[-1]}, f"page1-{uid}")
        assert [p["timestamp"] for p in first["outputs"]] == ends[:7] and first["next_start"] == ends[7]
        second = history.series(principal, sid, {"instrument_key": "GOOG", "timeframe": "1d",
                                                 "start": first["next_start"], "end": ends[-1]}, f"page2-{uid}")
        assert [p["timestamp"] for p in second["outputs"]] == ends[7:] and second["next_start"] is None
    finally:
        history.cfg = saved
    for point in first["outputs"] + second["outputs"]:  # each bar itself, visible from its end
        assert point["metadata"]["end"] == point["timestamp"] and point["metadata"]["start"] < point["timestamp"]


def test_series_and_backfill_refuse_bad_requests(alice, uid, api):
    sid = alice.sid(f"last-{uid}")
    alice.create_published(sid, LAST)
    t = datetime(2012, 6, 1, tzinfo=UTC).timestamp()
    assert error_code(series(alice, sid, start=t + 10, end=t)) == "invalid_range"
    assert series(alice, sid, start=t, end=t + 86400 * 3, extra=1).status_code == 422
    assert series(alice, sid, start="yesterday").status_code == 422
    assert series(alice, sid, start=t, end=float("1e300")).status_code == 422
    empty = series(alice, sid, instrument="NOSUCH", start=t, end=t + 86400 * 3)
    assert empty.status_code == 200 and empty.json()["outputs"] == []
    future = series(alice, sid, start=4_000_000_000, end=4_100_000_000)  # clamped to now: no bars
    assert error_code(future) == "invalid_range"
    eve = Caller(api, f"eve-{uid}", f"other-{uid}")
    assert series(eve, sid, start=t, end=t + 86400).status_code == 404
    free = Caller(api, f"free-{uid}", alice.tenant, tier="free")
    assert series(free, sid, start=t, end=t + 86400).status_code == 403
    assert error_code(subscribe(alice, sid, backfill=10**6)) == "backfill_too_large"
    assert alice.call("GET", "/subscriptions").json()["subscriptions"] == []  # nothing half written


def test_backfill_answers_history_at_once_dependencies_first(alice, uid, stack):
    rsi, regime = alice.sid(f"rsi-{uid}"), alice.sid(f"regime-{uid}")
    alice.create_published(rsi, example("rsi.py"))
    alice.create_published(regime, example("rsi_regime.py"), depends_on=[f"{rsi}@1"])
    params = {"rsi_script": rsi}
    resp = subscribe(alice, regime, params=params, backfill=15)
    assert resp.status_code == 201, resp.text
    assert resp.json()["backfill"]["statuses"] == {"ok": 15}
    ends = bar_ends(stack, "GOOG", "1d", last=15)
    signal = alice.call("GET", f"/signals/GOOG/custom/{regime}?timeframe=1d&history=15"
                               f"&params_hash={params_hash(params)}")
    assert signal.status_code == 200, signal.text
    body = signal.json()
    assert body["history"]["time"] == ends and body["timestamp"] == ends[-1]
    # the dependency's outputs for the same bar ends were published first (params {})
    assert sorted(t for t, *_ in rows(stack, alice.tenant, rsi)) == ends
    # and they are exactly what a series computes
    run = series(alice, regime, params=params, start=ends[0], end=ends[-1]).json()
    assert [p["value"] for p in run["outputs"]] == body["history"]["value"]


def _recent_candles(stack, instrument: str, n: int) -> list[float]:
    """n one-minute candles, the last one closed at the latest whole minute; their ends."""
    t0 = (int(datetime.now(UTC).timestamp()) // 60) * 60 - 60 * n
    rows_ = [CsvRow(datetime.fromtimestamp(t0 + 60 * i, tz=UTC), "1", "2", "0.5", str(100 + i), "10")
             for i in range(n)]
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
        assert load_rows(conn, instrument, "1m", rows_) == n
    return [t0 + 60 * (i + 1) for i in range(n)]


BUSY_LAST = """
def run(ctx):
    sum(range(300000))  # a few ms per evaluation: the backfill is still running when live events arrive
    return float(get_market_data(limit=1).close[-1])
"""


def test_backfill_with_concurrent_live_events_leaves_one_row_per_event(alice, uid, stack):
    """Live candle closes replayed through JetStream to a running scheduler while the subscription's
    backfill publishes the same bar ends: every event has exactly one history row and one stream
    message, none is lost (live events older than the backfill range included)."""
    rt = isolated(stack, uid)
    instrument = f"BF{uid}"
    ends = _recent_candles(stack, instrument, 60)
    sid = alice.sid(f"busy-{uid}")
    alice.create_published(sid, BUSY_LAST)
    live, backfill_n = ends[-50:], 40  # 10 live events before the backfill's range, 40 inside it
    scheduler = threading.Thread(target=run_scheduler, args=(rt, len(live), 60.0), daemon=True)
    scheduler.start()
    answers: list = []
    subscriber = threading.Thread(target=lambda: answers.append(
        subscribe(alice, sid, instrument=instrument, timeframe="1m", backfill=backfill_n)), daemon=True)
    try:
        subscriber.start()

        def subscribed() -> bool:
            with psycopg.connect(stack.pg_dsn) as conn:
                return conn.execute("SELECT 1 FROM subscriptions WHERE tenant = %s AND script_id = %s",
                                    (alice.tenant, sid)).fetchone() is not None

        assert wait_until(subscribed, interval=0.002)
        result = replay(instrument, "1m", start=live[0], cfg=rt)  # while the backfill runs
        assert result.published == len(live)
        subscriber.join(timeout=120)
        scheduler.join(timeout=120)
        assert not subscriber.is_alive() and not scheduler.is_alive()
    finally:
        delete_stream(rt)
    assert answers and answers[0].status_code == 201, answers and answers[0].text
    assert answers[0].json()["backfill"]["bars"] == backfill_n
    stored = rows(stack, alice.tenant, sid)
    times = [t for t, *_ in stored]
    assert times == sorted(set(times)) == live  # one row per event: the backfill's 40 and the 10 before
    assert {t: float(v) for t, _i, _p, v in stored} == {t: 100.0 + ends.index(t) for t in live}
    counts = stream_counts(stack, alice.tenant, instrument, "1m", sid)
    assert dict(counts) == {t: 1 for t in live}


def test_a_range_longer_than_the_tiers_page_is_fetched_page_by_page(alice, uid, stack, api):
    """pro answers at most 5,000 bars per request; the client follows `next_start` to the end."""
    from customscripts.series import fetch_series

    instrument = f"PG{uid}"
    ends = _recent_candles(stack, instrument, 5_010)
    sid = alice.sid(f"close-{uid}")
    alice.create_published(sid, "def run(ctx):\n    return float(get_market_data(limit=1).close[-1])\n")
    seen: list[int] = []
    outputs = fetch_series(api, alice.token, sid, {"instrument_key": instrument, "timeframe": "1m",
                                                   "start": ends[0], "end": ends[-1]},
                           progress=lambda done, _last: seen.append(done))
    assert seen == [5_000, 5_010]
    assert [p["timestamp"] for p in outputs] == ends
    assert [p["value"] for p in outputs] == [100.0 + i for i in range(5_010)]


def test_a_new_subscription_is_backfilled_by_its_tiers_default(alice, uid, stack):
    instrument = f"DF{uid}"
    ends = _recent_candles(stack, instrument, 250)
    sid = alice.sid(f"close-{uid}")
    alice.create_published(sid, "def run(ctx):\n    return float(get_market_data(limit=1).close[-1])\n")
    body = {"instrument_key": instrument, "timeframe": "1m"}
    first = alice.call("POST", f"/scripts/{sid}/subscribe", body)
    assert first.status_code == 201 and first.json()["backfill"]["bars"] == stack.tiers["pro"].default_backfill
    again = alice.call("POST", f"/scripts/{sid}/subscribe", body)  # an existing subscription: nothing more
    assert again.status_code == 200 and "backfill" not in again.json()
    assert [t for t, *_ in rows(stack, alice.tenant, sid)] == ends[-stack.tiers["pro"].default_backfill:]


def test_a_refused_backfill_leaves_a_working_subscription(alice, uid, stack):
    """At the caller's concurrent-execute cap the backfill is refused (429), never half done: the
    subscription stands and says so; subscribing again with `backfill` fills it."""
    from customscripts.auth import decode_token
    from customscripts.registry.concurrency import ExecuteSlots

    sid = alice.sid(f"close-{uid}")
    alice.create_published(sid, "def run(ctx):\n    return float(get_market_data(limit=1).close[-1])\n")
    slots, principal = ExecuteSlots(stack), decode_token(alice.token)
    tier = stack.tiers["pro"]
    leases = [slots.acquire(principal, tier, 60, f"hold-{i}") for i in range(tier.max_concurrent_executes_per_user)]
    try:
        first = subscribe(alice, sid, backfill=5)
    finally:
        for lease in leases:
            slots.release(lease)
    assert first.status_code == 201, first.text
    assert first.json()["backfill"]["error"]["code"] == "too_many_concurrent_executes"
    assert rows(stack, alice.tenant, sid) == []
    again = subscribe(alice, sid, backfill=5)
    assert again.status_code == 200 and again.json()["backfill"]["bars"] == 5
    assert len(rows(stack, alice.tenant, sid)) == 5
