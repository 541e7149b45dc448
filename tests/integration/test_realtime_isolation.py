"""Attacks on the realtime path (issue 10, item 4 and the realtime bullet of item 8), over the real
stack: candle closes through JetStream, the scheduler, the local provider's script functions, and
publishing to PostgreSQL, Redis and the stream.

- a forged "transient" error and a function that fails outright cost no other tenant its outputs;
- a function that holds its timeout on every event is cut off by its circuit breaker;
- a genuine data gateway outage is retried and published exactly once when the gateway is back;
- items of different users never share a sandboxed child (module state), and a shared evaluation
  runs for one principal, in a child of its own audience.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest
from prometheus_client import REGISTRY

from customscripts.app import app
from customscripts.faas.client import OpenFaaSClient
from customscripts.faas.naming import function_name
from customscripts.local import stack as localstack
from customscripts.marketdata.replayer import load_candles, replay
from customscripts.outputs import params_hash
from customscripts.realtime.events import Event
from tests.integration.realtime_support import (
    FunctionKiller,
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
from tests.integration.registry_support import Caller
from tests.waiting import wait_until

START = datetime(2012, 9, 4, tzinfo=UTC).timestamp()
EVENTS = 3
LAST_CLOSE = "def run(ctx):\n    return float(get_market_data(limit=3).close[-1])\n"
OUTAGE = ("data gateway at http://gateway-fn:8080 unavailable for get_market_data('GOOG', '1d'): 503 "
          "(gave up after 4 attempts)")
# what a script can do to look like an outage: raise the DataAccessError it has in its globals with
# the gateway client's own words, print a "retryable" result first, or fail a read of its own first
FORGERIES = {
    "raise": f"def run(ctx):\n    raise DataAccessError({OUTAGE!r})\n",
    "print": ("import json\n\ndef run(ctx):\n"
              "    print(json.dumps({'status': 'error', 'retryable': True,\n"
              "                      'error': {'type': 'DataSourceUnavailable'}}))\n"
              f"    raise DataAccessError({OUTAGE!r})\n"),
    "own-read": ("def run(ctx):\n    try:\n        get_market_data(instrument_key='NOSUCH', limit=-1)\n"
                 f"    except Exception:\n        pass\n    raise DataAccessError({OUTAGE!r})\n"),
}


@pytest.fixture
def rt(stack, uid):
    cfg = isolated(stack, uid)
    yield cfg
    delete_stream(cfg)


@pytest.fixture
def tenants(api, uid, stack):
    made: list[Caller] = []

    def make(name: str, tenant: str | None = None) -> Caller:
        caller = Caller(api, f"{name}-{uid}", tenant or f"{name}-tenant-{uid}")
        made.append(caller)
        return caller

    yield make
    for caller in made:
        drop_subscriptions(stack, caller.tenant)


def subscribed(caller: Caller, script_id: str, **body) -> None:
    resp = subscribe(caller, script_id, **body)
    assert resp.status_code == 201, resp.text


def closes(cfg, n: int = EVENTS) -> dict[float, float]:
    return {c["end_time"]: float(c["close"]) for c in load_candles(cfg, "GOOG", "1d", START, None, n)}


def assert_published_once(cfg, tenant: str, sid: str, expected: dict[float, float], phash: str = params_hash({})):
    """One history row and one stream message per event, and the latest value of the last event."""
    stored = rows(cfg, tenant, sid)
    assert len(stored) == len(expected) and {t: float(v) for t, *_rest, v in stored} == expected
    assert stream_counts(cfg, tenant, "GOOG", "1d", sid) == {t: 1 for t in expected}
    last = max(expected)
    assert latest(cfg, tenant, "GOOG", "1d", sid, phash) == {"value": expected[last], "timestamp": last,
                                                            "metadata": {}}


def audit_rows(cfg, tenant: str, sid: str, expect: int) -> list[tuple[str, str | None]]:
    """(status, detail) of the script's realtime audit rows, once `expect` are written."""
    return realtime_audit(cfg, tenant, [sid], expect, columns="status, detail")


def dead_letters(cfg, tenant: str) -> list[dict]:
    with psycopg.connect(cfg.pg_dsn) as conn:
        cur = conn.execute("SELECT tenant, user_id, script_id, version, params_hash, instrument_key, timeframe, "
                           "extract(epoch FROM event_time)::float8 AS time, reason, error, attempts, call_id "
                           "FROM realtime_dead_letters WHERE tenant = %s ORDER BY event_time", (tenant,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ----------------------------------------------------------------------------- item 4


def test_forged_transient_errors_and_a_failing_function_cost_no_other_tenant_its_outputs(rt, tenants, stack, uid):
    forger, crasher, good, chain = (tenants(n) for n in ("forger", "crasher", "good", "chain"))
    forged = {kind: forger.sid(f"forged-{kind}-{uid}") for kind in FORGERIES}
    for kind, sid in forged.items():
        forger.create_published(sid, FORGERIES[kind])
        subscribed(forger, sid)
    crashing, crash_top = crasher.sid(f"crash-{uid}"), crasher.sid(f"crash-top-{uid}")
    crasher.create_published(crashing, LAST_CLOSE)
    crasher.create_published(crash_top, f"def run(ctx):\n    return get_script_output('{crashing}')['value']\n",
                             depends_on=[f"{crashing}@1"])
    plain, base, top = good.sid(f"plain-{uid}"), chain.sid(f"base-{uid}"), chain.sid(f"top-{uid}")
    good.create_published(plain, LAST_CLOSE)
    chain.create_published(base, LAST_CLOSE)
    chain.create_published(top, f"def run(ctx):\n    return get_script_output('{base}')['value'] * 2\n",
                           depends_on=[f"{base}@1"])
    for caller, sid in ((crasher, crash_top), (good, plain), (chain, top)):
        subscribed(caller, sid)
    expected = closes(stack)
    replay("GOOG", "1d", start=START, limit=EVENTS, cfg=rt)
    attempts = 3
    cfg = dataclasses.replace(rt, scheduler_retry_attempts=attempts, scheduler_retry_backoff_s=0.05,
                              scheduler_breaker_strikes=100)  # the retry path alone (the breaker: below)
    before = counter("cs_realtime_dead_letters_total", reason="invocation_failed")
    with FunctionKiller(function_name(crashing, 1)) as killer:
        stats = run_scheduler(cfg, EVENTS, idle_exit_s=20)
    assert killer.kills > 0
    # every other tenant's output for these events: published exactly once
    assert_published_once(stack, good.tenant, plain, expected)
    assert_published_once(stack, chain.tenant, base, expected)
    assert_published_once(stack, chain.tenant, top, {t: c * 2 for t, c in expected.items()})
    # the events were acknowledged once, never left for redelivery
    assert stats.events == EVENTS and stats.retries == 0
    assert run_scheduler(cfg, 1, idle_exit_s=2).events == 0
    # each forged "outage" is that script's own error: recorded once per event, never retried
    for sid in forged.values():
        audit = audit_rows(stack, forger.tenant, sid, EVENTS)
        assert [s for s, _d in audit] == ["error"] * EVENTS
        assert all(d.startswith("DataAccessError: data gateway") for _s, d in audit), audit
        assert rows(stack, forger.tenant, sid) == []
    assert dead_letters(stack, forger.tenant) == []
    # the failing function: each evaluation tried `attempts` times, then dead-lettered, audited, counted
    letters = dead_letters(stack, crasher.tenant)
    assert [d["time"] for d in letters] == sorted(expected)
    for d in letters:
        assert (d["user_id"], d["script_id"], d["version"], d["params_hash"], d["instrument_key"], d["timeframe"],
                d["reason"], d["attempts"]) == (crasher.user_id, crashing, 1, params_hash({}), "GOOG", "1d",
                                                "invocation_failed", attempts)
        assert d["error"].startswith("InvocationFailed: ") and d["call_id"]
    assert stats.item_retries == EVENTS * (attempts - 1)  # the crasher's retries, and nothing else's
    assert stats.dead_letters == {"invocation_failed": EVENTS}
    assert counter("cs_realtime_dead_letters_total", reason="invocation_failed") - before == EVENTS
    audit = audit_rows(stack, crasher.tenant, crashing, EVENTS)
    assert [s for s, _d in audit] == ["error"] * EVENTS
    assert all(f"dead-lettered after {attempts} attempt(s)" in d for _s, d in audit), audit
    # nothing published for it; its dependent never ran on a stale value
    assert rows(stack, crasher.tenant, crashing) == [] and rows(stack, crasher.tenant, crash_top) == []
    assert [s for s, _d in audit_rows(stack, crasher.tenant, crash_top, EVENTS)] == ["dependency_failed"] * EVENTS


def test_function_holding_its_timeout_is_cut_off_by_its_breaker(rt, tenants, stack, uid):
    hostile, good = tenants("hostile"), tenants("bystander")
    slow, plain = hostile.sid(f"hang-{uid}"), good.sid(f"fine-{uid}")
    hostile.create_published(slow, "def run(ctx):\n    while True:\n        pass\n", limits={"timeout_ms": 300})
    good.create_published(plain, LAST_CLOSE)
    subscribed(hostile, slow)
    subscribed(good, plain)
    n = 8
    expected = closes(stack, n)
    replay("GOOG", "1d", start=START, limit=n, cfg=rt)
    strikes = rt.scheduler_breaker_strikes
    stats = run_scheduler(dataclasses.replace(rt, scheduler_fetch_batch=n), n, idle_exit_s=20)
    assert stats.events == n and stats.retries == 0
    assert_published_once(stack, good.tenant, plain, expected)
    # `strikes` evaluations held the function's timeout; the others never reached it
    statuses = [s for s, _d in audit_rows(stack, hostile.tenant, slow, n)]
    assert statuses == ["timeout"] * strikes + ["error"] * (n - strikes), statuses
    letters = dead_letters(stack, hostile.tenant)
    assert [(d["reason"], d["attempts"]) for d in letters] == [("circuit_open", 0)] * (n - strikes)
    assert [d["time"] for d in letters] == sorted(expected)[strikes:]


def breaker_batch(evaluator, times: list[float], hostile: str, bystander: str) -> list[str]:
    """Process one batch directly; the bystander's evaluations all ok; the hostile script's statuses in
    event order, a dead letter as its reason."""
    report = evaluator.process([Event("GOOG", "1d", t) for t in times])
    assert sorted(e.status for n, e in report.results.items() if n.script_id == bystander) == ["ok"] * len(times)
    return [e.status if e.status != "error" else e.error["dead_letter"]
            for n, e in sorted(report.results.items(), key=lambda kv: kv[0].time) if n.script_id == hostile]


def test_open_breaker_skips_the_function_until_its_cool_down_then_probes_once(tenants, stack, uid):
    """The breaker's life over the real functions: open -> dead letters without invoking it; after the
    cool-down one probe; failing again re-opens it for twice as long; a success closes it."""
    hostile, good = tenants("hostile"), tenants("bystander")
    slow, plain = hostile.sid(f"hang-{uid}"), good.sid(f"fine-{uid}")
    times = sorted(closes(stack, 16))
    hostile.create_published(slow, f"def run(ctx):\n    if ctx.timestamp < {times[12]}:\n        while True:\n"
                                   "            pass\n    return 1.0\n", limits={"timeout_ms": 300})
    good.create_published(plain, LAST_CLOSE)
    subscribed(hostile, slow)
    subscribed(good, plain)
    evaluator = app().evaluator(dataclasses.replace(stack, scheduler_breaker_strikes=2,
                                                    scheduler_breaker_cooldown_s=60))
    now = [time.monotonic()]
    evaluator.breakers.clock = lambda: now[0]

    def batch(ts: list[float]) -> list[str]:
        return breaker_batch(evaluator, ts, slow, plain)

    try:
        assert batch(times[0:4]) == ["timeout", "timeout", "circuit_open", "circuit_open"]
        assert batch(times[4:6]) == ["circuit_open"] * 2  # open: not invoked at all
        now[0] += 61
        assert batch(times[6:8]) == ["timeout", "circuit_open"]  # one probe, failed: open again
        now[0] += 61
        assert batch(times[8:10]) == ["circuit_open"] * 2  # for twice as long
        now[0] += 61
        assert batch(times[10:12]) == ["timeout", "circuit_open"]
        now[0] += 241
        assert batch(times[12:16]) == ["ok"] * 4  # the probe succeeds: closed, the rest in one go
    finally:
        evaluator.close()
    assert len(rows(stack, good.tenant, plain)) == 16


def test_function_mixing_timeouts_into_ok_answers_is_cut_off_too(tenants, stack, uid):
    """Timeouts on about every other event, ok answers between them: the clean answers do not wipe
    the timeouts out, so the breaker still opens and later batches do not pay for it again."""
    hostile, good = tenants("hostile"), tenants("bystander")
    slow, plain = hostile.sid(f"flaky-{uid}"), good.sid(f"fine-{uid}")
    hostile.create_published(slow, "def run(ctx):\n    if int(ctx.timestamp) // 86400 % 2:\n        while True:\n"
                                   "            pass\n    return 1.0\n", limits={"timeout_ms": 300})
    good.create_published(plain, LAST_CLOSE)
    subscribed(hostile, slow)
    subscribed(good, plain)
    times = sorted(closes(stack, 24))
    strikes = stack.scheduler_breaker_strikes
    evaluator = app().evaluator(stack)
    statuses: list[list[str]] = []
    try:
        for k in range(3):
            statuses.append(breaker_batch(evaluator, times[8 * k:8 * k + 8], slow, plain))
    finally:
        evaluator.close()
    flat = [s for batch in statuses for s in batch]
    # it costs at most one chunk's timeouts past the strikes, then is skipped (cool-down: 10 s)
    assert flat.count("timeout") <= strikes + 8, statuses
    assert statuses[-1] == ["circuit_open"] * 8, statuses
    assert len(rows(stack, good.tenant, plain)) == 24


def test_genuine_gateway_outage_is_retried_and_published_once_when_it_is_back(rt, tenants, stack, uid):
    """gateway-fn removed from the provider (connections refused): the supervisor marks the results
    retryable; the scheduler retries them and, once gateway-fn is deployed again, publishes once."""
    reader = tenants("reader")
    sid = reader.sid(f"reads-{uid}")
    # EURUSD 1h is not sent along with a GOOG 1d batch: this read always goes to gateway-fn
    reader.create_published(sid, "def run(ctx):\n    get_market_data(instrument_key='EURUSD', timeframe='1h', "
                                 "limit=1)\n    return float(ctx.timestamp)\n")
    subscribed(reader, sid)
    expected = {t: t for t in closes(stack)}
    replay("GOOG", "1d", start=START, limit=EVENTS, cfg=rt)
    cfg = dataclasses.replace(rt, scheduler_retry_attempts=200, scheduler_retry_backoff_s=0.05,
                              scheduler_retry_backoff_max_s=0.25)
    before = counter("cs_realtime_item_retries_total", reason="data_source_unavailable")
    stats: list = []
    with OpenFaaSClient(stack.provider_url) as client:
        client.delete("gateway-fn")
    try:
        worker = threading.Thread(target=lambda: stats.append(run_scheduler(cfg, EVENTS, idle_exit_s=60)))
        worker.start()
        assert wait_until(lambda: counter("cs_realtime_item_retries_total", reason="data_source_unavailable")
                          > before, timeout=60)
    finally:
        localstack.deploy_platform(stack)
    worker.join(timeout=120)
    assert not worker.is_alive() and stats
    assert stats[0].events == EVENTS and stats[0].retries == 0 and stats[0].item_retries >= 1
    assert stats[0].statuses == {"ok": EVENTS} and not stats[0].dead_letters
    assert_published_once(stack, reader.tenant, sid, expected)
    assert dead_letters(stack, reader.tenant) == []


# ----------------------------------------------------------------------------- item 8 (realtime bullet)

LEAKY = ("SEEN = []\n\n"
         "def run(ctx):\n"
         "    SEEN.append(int(ctx.params['k']))\n"
         "    return {'value': float(ctx.params['k']), 'metadata': {'seen': sorted(set(SEEN))}}\n")


def _seen(cfg, tenant: str, sid: str, k: int) -> list[list[int]]:
    with psycopg.connect(cfg.pg_dsn) as conn:
        found = conn.execute("SELECT metadata FROM script_outputs WHERE tenant = %s AND script_id = %s AND "
                             "params_hash = %s ORDER BY time", (tenant, sid, params_hash({"k": k}))).fetchall()
    return [(m if isinstance(m, dict) else json.loads(m))["seen"] for (m,) in found]


def test_one_users_params_never_reach_another_users_output(rt, tenants, stack, uid):
    alice = tenants("alice", f"shared-{uid}")
    bob, carol = tenants("bob", alice.tenant), tenants("carol", alice.tenant)
    sid = alice.sid(f"leaky-{uid}")
    alice.create_published(sid, LEAKY, permissions={"allowed_users": [bob.user_id, carol.user_id]},
                           input_schema={"type": "object", "properties": {"k": {"type": "integer"}},
                                         "required": ["k"]})
    subscribed(alice, sid, params={"k": 1})
    subscribed(bob, sid, params={"k": 1000})
    subscribed(bob, sid, params={"k": 7})  # one evaluation shared by bob and carol
    subscribed(carol, sid, params={"k": 7})
    n = 4
    replay("GOOG", "1d", start=START, limit=n, cfg=rt)
    stats = run_scheduler(dataclasses.replace(rt, scheduler_fetch_batch=n), n)
    assert stats.events == n and stats.statuses == {"ok": 3 * n}
    mine = _seen(stack, alice.tenant, sid, 1)
    theirs = _seen(stack, alice.tenant, sid, 1000)
    shared = _seen(stack, alice.tenant, sid, 7)
    assert len(mine) == len(theirs) == len(shared) == n
    assert all(seen == [1] for seen in mine), mine  # alice's outputs never reflect bob's params
    assert all(seen == [1000] for seen in theirs), theirs
    # the shared evaluation ran once per event, for one principal, and reflects only its own params
    assert all(seen == [7] for seen in shared), shared
    assert stream_counts(stack, alice.tenant, "GOOG", "1d", sid) == {t: 3 for t in closes(stack, n)}
    assert len(audit_rows(stack, alice.tenant, sid, 3 * n)) == 3 * n
