"""Realtime execution on the real stack: subscriptions over HTTP, candle closes replayed from the
sample GOOG/EURUSD data through JetStream, the scheduler invoking the script functions, and outputs
published to Redis (latest + stream) and TimescaleDB (history)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import psycopg
import pytest

from customscripts.app import app
from customscripts.marketdata.replayer import load_candles, replay
from customscripts.outputs import params_hash
from customscripts.realtime.events import Event
from tests.integration.realtime_support import (
    delete_stream,
    drop_subscriptions,
    isolated,
    latest,
    realtime_audit,
    rows,
    run_scheduler,
    stream_counts,
    subscribe,
)
from tests.integration.registry_support import LISTS, Caller, error_code
from tests.integration.test_execute_e2e import RSI_SCRIPT

GOOG_START = datetime(2012, 6, 1, tzinfo=UTC).timestamp()
EURUSD_START = datetime(2018, 1, 2, tzinfo=UTC).timestamp()
LAST_CLOSE = "def run(ctx):\n    return float(get_market_data(limit=3).close[-1])\n"


@pytest.fixture
def rt(stack, uid):
    cfg = isolated(stack, uid)
    yield cfg
    delete_stream(cfg)


@pytest.fixture
def alice(api, uid, stack):
    caller = Caller(api, f"alice-{uid}", f"tenant-{uid}")
    yield caller
    drop_subscriptions(stack, caller.tenant)


def closes(cfg, instrument: str, timeframe: str, start: float, limit: int) -> dict[float, float]:
    return {c["end_time"]: float(c["close"]) for c in load_candles(cfg, instrument, timeframe, start, None, limit)}


# ----------------------------------------------------------------------------- API


def test_subscribe_list_unsubscribe(alice, uid, api):
    alice.create_published(f"sma-{uid}", LAST_CLOSE,
                           input_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    first = subscribe(alice, f"sma-{uid}", params={"n": 5})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["version"] == 1 and body["params_hash"] == params_hash({"n": 5}) and body["created"] is True
    again = subscribe(alice, f"sma-{uid}", params={"n": 5})
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert subscribe(alice, f"sma-{uid}", params={"n": "five"}).status_code == 422
    assert error_code(subscribe(alice, f"sma-{uid}", timeframe="daily")) == "invalid_timeframe"
    other = subscribe(alice, f"sma-{uid}", instrument="EURUSD", timeframe="1h")
    assert other.status_code == 201
    listed = alice.call("GET", "/subscriptions").json()["subscriptions"]
    assert [s["id"] for s in listed] == [body["id"], other.json()["id"]]
    assert len(alice.call("GET", f"/subscriptions?script_id=nothing-{uid}").json()["subscriptions"]) == 0
    # not entitled (same tenant) and invisible (other tenant)
    bob = Caller(api, f"bob-{uid}", alice.tenant)
    assert error_code(subscribe(bob, f"sma-{uid}")) == "not_entitled"
    eve = Caller(api, f"eve-{uid}", f"other-{uid}")
    assert subscribe(eve, f"sma-{uid}").status_code == 404
    assert eve.call("DELETE", f"/scripts/sma-{uid}/subscriptions/{body['id']}").status_code == 404
    assert alice.call("DELETE", f"/scripts/sma-{uid}/subscriptions/{body['id']}").status_code == 204
    assert alice.call("DELETE", f"/scripts/sma-{uid}/subscriptions/{body['id']}").status_code == 404
    assert len(alice.call("GET", "/subscriptions").json()["subscriptions"]) == 1


def test_subscription_cap_of_the_tier(alice, uid, stack):
    import dataclasses

    from customscripts.app import app
    from customscripts.auth import decode_token
    from customscripts.realtime.service import RealtimeService

    sid = alice.sid(f"cap-{uid}")
    alice.create_published(sid, LAST_CLOSE)
    svc = app().realtime
    tiers = {**stack.tiers, "pro": dataclasses.replace(stack.tiers["pro"], max_subscriptions=2)}
    capped = RealtimeService(svc.registry, svc.store, svc.outputs, svc.redis, dataclasses.replace(stack, tiers=tiers),
                             invoker=svc.invoker, history=svc.history)
    principal = decode_token(alice.token)
    for tf in ("1d", "1h"):
        assert capped.subscribe(principal, sid, {"instrument_key": "GOOG", "timeframe": tf, "backfill": 0})["created"]
    from customscripts.errors import Forbidden

    with pytest.raises(Forbidden) as err:
        capped.subscribe(principal, sid, {"instrument_key": "GOOG", "timeframe": "1w"})
    assert err.value.code == "subscription_quota_exceeded"
    # re-subscribing to an existing one is not a new subscription
    assert capped.subscribe(principal, sid, {"instrument_key": "GOOG", "timeframe": "1d"})["created"] is False


def test_dependency_that_needs_params_cannot_be_subscribed_through(alice, uid):
    alice.create_published(f"needy-{uid}", "def run(ctx):\n    return float(ctx.params['n'])\n",
                           input_schema={"type": "object", "required": ["n"]})
    needy = alice.sid(f"needy-{uid}")
    alice.create_published(f"top-{uid}", f"def run(ctx):\n    return get_script_output('{needy}')['value']\n",
                           depends_on=[f"needy-{uid}@1"])
    assert error_code(subscribe(alice, f"top-{uid}")) == "invalid_dependency_params"


# ----------------------------------------------------------------------------- replay driven


def test_replayed_goog_and_eurusd_publish_every_event(alice, uid, rt, stack):
    sid = alice.sid(f"last-{uid}")
    alice.create_published(sid, LAST_CLOSE)
    assert subscribe(alice, sid).status_code == 201
    assert subscribe(alice, sid, instrument="EURUSD", timeframe="1h").status_code == 201
    goog = replay("GOOG", "1d", start=GOOG_START, limit=25, cfg=rt)
    eur = replay("EURUSD", "1h", start=EURUSD_START, limit=25, cfg=rt)
    stats = run_scheduler(rt, goog.published + eur.published)
    assert set(stats.statuses) == {"ok"} and stats.statuses["ok"] >= 50
    stored = rows(stack, alice.tenant, sid)
    for instrument, tf, start in (("GOOG", "1d", GOOG_START), ("EURUSD", "1h", EURUSD_START)):
        expected = closes(stack, instrument, tf, start, 25)
        got = {t: float(v) for t, inst, _h, v in stored if inst == instrument}
        assert got == expected  # one history row per event, with this event's close
        assert stream_counts(stack, alice.tenant, instrument, tf, sid) == {t: 1 for t in expected}
        last_time = max(expected)
        assert latest(stack, alice.tenant, instrument, tf, sid, params_hash({})) == {
            "value": expected[last_time], "timestamp": last_time, "metadata": {}}
    # the signal endpoint answers like a built-in indicator, history from TimescaleDB
    resp = alice.call("GET", f"/signals/GOOG/custom/{sid}?timeframe=1d&history=5")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    goog_closes = closes(stack, "GOOG", "1d", GOOG_START, 25)
    assert body["indicator"] == f"custom:{sid}" and body["timestamp"] == max(goog_closes)
    assert body["history"]["time"] == sorted(goog_closes)[-5:]


def test_signal_endpoint_is_tenant_scoped_and_entitled_only(alice, uid, api, rt, stack):
    sid = alice.sid(f"sig-{uid}")
    alice.create_published(sid, LAST_CLOSE, permissions={"allowed_users": [f"carol-{uid}"]})
    assert subscribe(alice, sid).status_code == 201
    replay("GOOG", "1d", start=GOOG_START, limit=3, cfg=rt)
    run_scheduler(rt, 3)
    carol = Caller(api, f"carol-{uid}", alice.tenant)  # entitled, same tenant: sees the tenant's value
    assert carol.call("GET", f"/signals/GOOG/custom/{sid}?timeframe=1d").status_code == 200
    bob = Caller(api, f"bob-{uid}", alice.tenant)  # same tenant, not entitled
    assert error_code(bob.call("GET", f"/signals/GOOG/custom/{sid}?timeframe=1d")) == "not_entitled"
    eve = Caller(api, f"eve-{uid}", f"other-{uid}")  # other tenant: the script does not exist for her
    assert eve.call("GET", f"/signals/GOOG/custom/{sid}?timeframe=1d").status_code == 404
    params = json.dumps({"x": 1})
    assert error_code(alice.call("GET", f"/signals/GOOG/custom/{sid}?timeframe=1d&params={params}")) == "no_signal"


def test_three_level_chain_is_evaluated_in_order_for_each_event(alice, uid, rt, stack):
    base, mid, top = (alice.sid(f"{n}-{uid}") for n in ("base", "mid", "top"))
    alice.create_published(base, LAST_CLOSE)
    alice.create_published(mid, f"def run(ctx):\n    return get_script_output('{base}')['value'] * 2\n",
                           depends_on=[f"{base}@1"])
    alice.create_published(top, f"def run(ctx):\n    return get_script_output('{mid}')['value'] + "
                                "ctx.params['add']\n", depends_on=[f"{mid}@1"])
    sub = subscribe(alice, top, params={"add": 1})
    assert sub.json()["dependencies"] == [f"{base}@1", f"{mid}@1"]
    result = replay("GOOG", "1d", start=GOOG_START, limit=20, cfg=rt)
    stats = run_scheduler(rt, result.published)
    assert set(stats.statuses) == {"ok"} and stats.statuses["ok"] >= 60
    expected = closes(stack, "GOOG", "1d", GOOG_START, 20)
    # if a level ran before its dependency was published for the event, it would read the previous
    # event's value (or none) and these would differ
    assert {t: float(v) for t, *_rest, v in rows(stack, alice.tenant, top)} == {t: c * 2 + 1 for t, c in
                                                                              expected.items()}
    assert {t: float(v) for t, *_rest, v in rows(stack, alice.tenant, mid)} == {t: c * 2 for t, c in
                                                                              expected.items()}


def test_realtime_equals_one_time_executions_no_repaint(alice, uid, rt, stack):
    sid = alice.sid(f"rsi-{uid}")
    alice.create_published(sid, RSI_SCRIPT)
    assert subscribe(alice, sid, params={"period": 14}).status_code == 201
    result = replay("GOOG", "1d", start=GOOG_START, limit=15, cfg=rt)
    run_scheduler(rt, result.published)
    realtime = {t: float(v) for t, *_rest, v in rows(stack, alice.tenant, sid)}
    assert len(realtime) == 15
    for t, value in realtime.items():
        one_time = alice.call("POST", f"/scripts/{sid}/execute", {
            "instrument_key": "GOOG", "timeframe": "1d", "params": {"period": 14}, "timestamp": t}).json()
        assert one_time["status"] == "ok", one_time
        assert one_time["output"]["value"] == value, t


def test_failed_dependency_marks_dependents_and_never_reuses_a_stale_value(alice, uid, stack):
    """The dependency fails on every other event; its dependent is dependency_failed there (never
    invoked, never reading the previous event's output) and ok elsewhere."""
    base, dep = alice.sid(f"flaky-{uid}"), alice.sid(f"user-{uid}")
    alice.create_published(base, "def run(ctx):\n    if int(ctx.timestamp) // 86400 % 2:\n"
                                 "        raise ValueError('odd day')\n    return float(ctx.timestamp)\n")
    alice.create_published(dep, f"def run(ctx):\n    return get_script_output('{base}')['value']\n",
                           depends_on=[f"{base}@1"])
    assert subscribe(alice, dep).status_code == 201
    times = sorted(closes(stack, "GOOG", "1d", GOOG_START, 6))
    evaluator = app().evaluator(stack)
    try:
        report = evaluator.process([Event("GOOG", "1d", t) for t in times])
    finally:
        evaluator.close()
    by_time = {n.time: e for n, e in report.results.items() if n.script_id == dep}
    for t in times:
        odd = int(t) // 86400 % 2
        assert by_time[t].status == ("dependency_failed" if odd else "ok"), t
        if odd:
            assert base in by_time[t].error["message"]
    stored = {t: float(v) for t, *_rest, v in rows(stack, alice.tenant, dep)}
    assert stored == {t: t for t in times if not int(t) // 86400 % 2}
    # every evaluation leaves an audit row, as one-time executions do
    audit = realtime_audit(stack, alice.tenant, [base, dep], expect=2 * len(times))
    assert sorted(audit) == sorted(
        [(base, "error" if int(t) // 86400 % 2 else "ok", alice.user_id) for t in times]
        + [(dep, "dependency_failed" if int(t) // 86400 % 2 else "ok", alice.user_id) for t in times])


def test_lost_entitlement_takes_effect_on_the_next_evaluation(api, uid, stack):
    author = Caller(api, f"author-{uid}", f"vendor-{uid}", features=LISTS)
    buyer = Caller(api, f"buyer-{uid}", f"buyer-tenant-{uid}")
    sid = author.sid(f"listed-{uid}")
    author.create_published(sid, LAST_CLOSE, permissions={"marketplace": True})
    assert buyer.call("POST", f"/scripts/{sid}/marketplace/subscribe").status_code == 201
    try:
        assert subscribe(buyer, sid).status_code == 201
        times = sorted(closes(stack, "GOOG", "1d", GOOG_START, 2))
        evaluator = app().evaluator(stack)
        try:
            first = evaluator.process([Event("GOOG", "1d", times[0])])
            assert first.statuses == {"ok": 1}
            with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:  # the marketplace subscription lapses
                conn.execute("DELETE FROM marketplace_subscriptions WHERE script_id = %s AND user_id = %s",
                             (sid, buyer.user_id))
            second = evaluator.process([Event("GOOG", "1d", times[1])])
        finally:
            evaluator.close()
        assert second.statuses == {"denied": 1} and second.published == 0
        assert realtime_audit(stack, buyer.tenant, [sid], expect=2) == [(sid, "ok", buyer.user_id),
                                                                          (sid, "denied", buyer.user_id)]
        # outputs went to the buyer's tenant only, and only for the entitled event
        assert [r[0] for r in rows(stack, buyer.tenant, sid)] == [times[0]]
        assert rows(stack, author.tenant, sid) == []
    finally:
        drop_subscriptions(stack, buyer.tenant)


def test_timeout_is_confined_to_its_own_evaluations(alice, uid, stack):
    slow, fast = alice.sid(f"slow-{uid}"), alice.sid(f"fast-{uid}")
    alice.create_published(slow, "def run(ctx):\n    while True:\n        pass\n", limits={"timeout_ms": 200})
    alice.create_published(fast, LAST_CLOSE)
    assert subscribe(alice, slow).status_code == 201
    assert subscribe(alice, fast).status_code == 201
    times = sorted(closes(stack, "GOOG", "1d", GOOG_START, 2))
    evaluator = app().evaluator(stack)
    try:
        report = evaluator.process([Event("GOOG", "1d", t) for t in times])
    finally:
        evaluator.close()
    assert report.statuses == {"timeout": 2, "ok": 2}
    assert len(rows(stack, alice.tenant, fast)) == 2 and rows(stack, alice.tenant, slow) == []


def test_redelivered_events_publish_once(alice, uid, stack):
    sid = alice.sid(f"idem-{uid}")
    alice.create_published(sid, LAST_CLOSE)
    assert subscribe(alice, sid).status_code == 201
    events = [Event("GOOG", "1d", t) for t in sorted(closes(stack, "GOOG", "1d", GOOG_START, 5))]
    evaluator = app().evaluator(stack)
    try:
        assert evaluator.process(events).published == 5
        assert evaluator.process(events).published == 0  # the same events again: nothing new goes out
    finally:
        evaluator.close()
    assert len(rows(stack, alice.tenant, sid)) == 5
    counts = stream_counts(stack, alice.tenant, "GOOG", "1d", sid)
    assert set(counts.values()) == {1} and len(counts) == 5
    assert math.isclose(latest(stack, alice.tenant, "GOOG", "1d", sid, params_hash({}))["timestamp"],
                        events[-1].time)


def test_realtime_reads_have_their_own_rate_budget(stack, uid):
    """Exhausting a user's interactive gateway budget does not starve their realtime evaluations."""
    from customscripts.gateway.ratelimit import RateLimiter

    limiter = RateLimiter(stack, clock=lambda: 1000.0)  # frozen clock: no refill during the test
    burst = stack.tiers["pro"].burst
    who = {"tenant": f"rl-{uid}", "user": f"u-{uid}", "script_id": f"s-{uid}", "tier_name": "pro"}
    assert limiter.check(**who, cost=burst).allowed
    assert not limiter.check(**who).allowed
    assert limiter.check(**who, realtime=True).allowed


def test_an_evaluator_uses_the_shared_invoker_and_leaves_the_executors_budget_alone(stack):
    """The evaluator re-checks deployments on its own budget's schedule; the executor's budget (shared
    with one-time executes) keeps its own setting."""
    shared = app().executor.invoker
    before = shared.budget.cache_s
    evaluator = app().evaluator(stack)
    try:
        own = evaluator.invoker
        assert own.registry is shared.registry and own.client is shared.client
        assert own.budget is not shared.budget and own.budget.lru is shared.budget.lru
        assert shared.budget.cache_s == before and own.budget.cache_s >= 60
    finally:
        evaluator.close()
