"""Realtime faults on the real stack (issue 13): acknowledged means durable, a dependent never reads a
wrong dependency value, a replica stops within the grace, and a replay survives a SIGKILL of every
component with exactly one row, one stream message, the right latest value and correct dependent
values per event. Every killed service is restored by the test that killed it. The 200-candle run
with recovery seconds is bench/bench_faults.py; the restarts (graceful stops) of Redis, PostgreSQL
and NATS are tests/integration/test_realtime_failures.py."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

from customscripts import db
from customscripts.app import app
from customscripts.marketdata.replayer import load_candles
from customscripts.outputs import OutputRow, OutputStore, params_hash
from customscripts.realtime.events import Event
from customscripts.realtime.publisher import Publisher
from tests.integration.realtime_support import (
    drop_subscriptions,
    fault_replay,
    isolated_stream,
    kill_service,
    publish_candles,
    restore_service,
    rows,
    run_scheduler,
    scheduler_replica,
    stop_replica,
    stream_counts,
    subscribe,
)
from tests.integration.registry_support import Caller
from tests.waiting import wait_until

START = datetime(2011, 3, 1, tzinfo=UTC).timestamp()
REPLAY = 45  # candles per fault test (bench/bench_faults.py replays 200)


@pytest.fixture
def rt(stack, uid):
    with isolated_stream(stack, uid, scheduler_fetch_batch=3) as cfg:
        yield cfg


@pytest.fixture
def owner(api, uid, stack):
    caller = Caller(api, f"ft-{uid}", f"ft-tenant-{uid}")
    yield caller
    drop_subscriptions(stack, caller.tenant)


def _redis(cfg):
    import redis

    return redis.Redis(host=cfg.redis_host, port=cfg.redis_port)


def _row(uid: str, t: float, value: float, script: str = "s") -> OutputRow:
    return OutputRow(time=t, tenant=f"ft-{uid}", instrument_key="GOOG", timeframe="1d", script_id=f"{script}-{uid}",
                     version=1, params_hash=params_hash({}), value=value)


# ----------------------------------------------------------------------------- acknowledged => durable


def test_published_rows_survive_a_postgres_sigkill_even_where_commits_default_to_async(stack, uid):
    """The publisher's commit returned => the row is on disk: SIGKILL PostgreSQL (postmaster and every
    backend) right after each publish, on sessions whose default is `synchronous_commit = off`."""
    lazy = db.pool(stack.pg_dsn + " options='-c synchronous_commit=off'", max_size=2)
    publisher = Publisher(_redis(stack), OutputStore(lazy))
    published: list[float] = []
    try:
        for round_ in range(3):
            batch = [_row(uid, 1_000_000.0 + 100 * round_ + i, float(i)) for i in range(50)]
            publisher.publish(batch)  # returns once the rows committed and Redis marked them seen
            kill_service(stack, "postgres")
            published += [float(r.time) for r in batch]
            restore_service(stack, "postgres")
    finally:
        lazy.close()
        restore_service(stack, "postgres")
    stored = {t for t, *_ in rows(stack, f"ft-{uid}", f"s-{uid}")}
    assert stored == set(published)


def test_a_retry_restores_a_missing_row_whatever_redis_says_and_sends_no_second_message(stack, uid):
    """Redis says `seen` but the row is gone (a lost write before this fix, a restore from backup):
    the retry writes the row again and sends no second stream message."""
    publisher = Publisher(_redis(stack), OutputStore(db.pool(stack.pg_dsn)))
    batch = [_row(uid, 2_000_000.0 + i, float(i)) for i in range(5)]
    assert publisher.publish_rows(batch) == (5, 5)
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM script_outputs WHERE tenant = %s AND time = %s",
                     (f"ft-{uid}", datetime.fromtimestamp(2_000_002.0, tz=UTC)))
    assert publisher.publish_rows(batch) == (0, 1)  # nothing new on the stream, the lost row back
    assert len(rows(stack, f"ft-{uid}", f"s-{uid}")) == 5
    assert stream_counts(stack, f"ft-{uid}", "GOOG", "1d", f"s-{uid}") == {2_000_000.0 + i: 1 for i in range(5)}


# ----------------------------------------------------------------------------- dependency reads

SUM3 = ("def run(ctx):\n    h = get_script_output({a!r}, history=3)\n"
        "    return float(sum(h['columns']['value']))\n")
TIMES_A = "def run(ctx):\n    return float(get_market_data(limit=1).close[-1])\n"


class _DelayedPublisher(Publisher):
    """A replica whose history insert is slow: it is still publishing T-1 while another evaluates T."""

    def __init__(self, inner: Publisher, delay_s: float) -> None:
        super().__init__(inner.redis, inner.outputs)
        self.delay_s = delay_s

    def publish_rows(self, rows):
        time.sleep(self.delay_s)
        return super().publish_rows(rows)


def test_dependent_never_reads_a_window_with_a_bar_another_replica_is_still_publishing(owner, stack, uid):
    """Two replicas: one publishes A at T-1 slowly while the other evaluates A and B at T. B reads A's
    last three outputs: it gets A at T-2, T-1, T, or fails with dependency_failed; never T-3, T-2, T."""
    a = owner.sid(f"dep-a-{uid}")
    owner.create_published(a, TIMES_A)
    b = owner.sid(f"dep-b-{uid}")
    owner.create_published(b, SUM3.format(a=a), depends_on=[f"{a}@1"])
    for sid in (a, b):
        assert subscribe(owner, sid).status_code == 201
    candles = load_candles(stack, "GOOG", "1d", START, None, 6)
    close = {c["end_time"]: float(c["close"]) for c in candles}
    times = sorted(close)
    fast, slow = app().evaluator(stack), app().evaluator(stack)
    slow.publisher = _DelayedPublisher(slow.publisher, 3.0)
    try:
        fast.process([Event("GOOG", "1d", t) for t in times[:4]])  # history up to T-2
        behind = threading.Thread(target=slow.process, args=([Event("GOOG", "1d", times[4])],))
        behind.start()  # replica 2 on T-1, its insert delayed
        time.sleep(0.5)
        report = fast.process([Event("GOOG", "1d", times[5])])  # replica 1 on T meanwhile
        behind.join(timeout=60)
    finally:
        fast.close()
        slow.close()
    [ev] = [e for n, e in report.results.items() if n.script_id == b]
    stored = {t: float(v) for t, _i, _p, v in rows(stack, owner.tenant, b)}
    expected = sum(close[t] for t in times[3:6])
    assert ev.status in ("ok", "dependency_failed"), ev.error
    if ev.status == "ok":
        assert stored[times[5]] == expected
    else:
        assert times[5] not in stored and a in str(ev.error)
    # the earlier windows were whole: each equals the sum of its three closes
    for i in range(2, 5):
        assert stored[times[i]] == sum(close[t] for t in times[i - 2:i + 1])


def test_dependency_read_at_an_event_never_returns_an_older_point(owner, stack, uid):
    """After A's output at T is lost (as a crash with asynchronous commits lost it), B evaluated at T
    through gateway-fn reads A's latest and A's history: both fail with dependency_failed, neither
    passes A at T-1 off as A at T."""
    a = owner.sid(f"lost-a-{uid}")
    owner.create_published(a, TIMES_A)
    b_latest = owner.sid(f"lost-b-{uid}")
    owner.create_published(b_latest, f"def run(ctx):\n    return get_script_output({a!r})['value']\n",
                           depends_on=[f"{a}@1"])
    b_window = owner.sid(f"lost-w-{uid}")
    owner.create_published(b_window, SUM3.format(a=a), depends_on=[f"{a}@1"])
    candles = load_candles(stack, "GOOG", "1d", START, None, 4)
    times = [c["end_time"] for c in candles]
    for sid in (a, b_latest, b_window):
        assert subscribe(owner, sid).status_code == 201
    evaluator = app().evaluator(stack)
    evaluator.prefetch = False  # every read through gateway-fn
    try:
        evaluator.process([Event("GOOG", "1d", t) for t in times[:3]])
        # T's evaluation of A only (as if published, then lost): B's read must notice
        with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM subscriptions WHERE tenant = %s AND script_id <> %s", (owner.tenant, a))
        evaluator.process([Event("GOOG", "1d", times[3])])
        with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM script_outputs WHERE tenant = %s AND script_id = %s AND time = %s",
                         (owner.tenant, a, datetime.fromtimestamp(times[3], tz=UTC)))
        from customscripts.execution import Scope

        for sid in (b_latest, b_window):
            closure = [(a, 1), (sid, 1)]
            ev_token = evaluator.invoker.execution_token(sid, 1, Scope(owner.user_id, owner.tenant, "pro"), times[3],
                                                         closure, f"c{uid}", realtime=True)
            item = {"instrument_key": "GOOG", "timeframe": "1d", "params": {}, "timestamp": times[3]}
            answer = evaluator.invoker.invoke(sid, 1, {"items": [item], "execution_token": ev_token},
                                              Scope(owner.user_id, owner.tenant, "pro"), f"c{uid}", timeout=30)
            [result] = answer["results"]
            assert result["status"] == "dependency_failed", result
            assert a in str(result.get("error"))
    finally:
        evaluator.close()


# ----------------------------------------------------------------------------- graceful shutdown

SLOW = ("def run(ctx):\n    n = 0\n    for _ in range(3_000_000):\n        n += 1\n"  # ~0.3 s of CPU per item
        "    return float(get_market_data(limit=1).close[-1])\n")


def test_sigterm_stops_an_idle_and_a_busy_replica_within_the_grace_and_loses_nothing(rt, owner, stack, uid):
    idle = scheduler_replica(rt)
    try:
        wait_until(lambda: False, timeout=3)  # let it connect and start fetching
    finally:
        code = stop_replica(idle, timeout=30)
    assert code == 0  # exited by itself on SIGTERM (stop_replica kills and returns None after 30 s)
    sid = owner.sid(f"slow-{uid}")
    owner.create_published(sid, SLOW)
    assert subscribe(owner, sid).status_code == 201
    candles = load_candles(stack, "GOOG", "1d", START, None, 12)
    publish_candles(rt, candles)
    busy = scheduler_replica(rt, CS_SCHEDULER_STOP_GRACE_S="1")
    try:
        wait_until(lambda: len(rows(stack, owner.tenant, sid)) >= 1, timeout=60, interval=0.05)
    finally:
        code = stop_replica(busy, timeout=30)  # mid-batch: three 0.3 s items outlast the 1 s grace
    assert code == 0
    run_scheduler(rt, events=10**9, idle_exit_s=2 * rt.scheduler_ack_wait_s)  # another replica drains
    stored = {t: float(v) for t, _i, _p, v in rows(stack, owner.tenant, sid)}
    assert stored == {c["end_time"]: float(c["close"]) for c in candles}
    assert stream_counts(stack, owner.tenant, "GOOG", "1d", sid) == {c["end_time"]: 1 for c in candles}


# ----------------------------------------------------------------------------- the fault suite


@pytest.mark.parametrize("fault", ["scheduler", "replica", "redis", "postgres", "nats", "s3", "function",
                                   "gateway-fn", "registry-fn"])
def test_replay_survives_a_sigkill(fault, rt, owner, stack):
    candles = load_candles(stack, "GOOG", "1d", START, None, REPLAY)
    run = fault_replay(rt, owner, fault, candles, log_path=str(stack.state_dir / "logs" / "faults-scheduler.log"))
    o = run.outcome
    assert o.exact, (o.rows, o.duplicates, o.gaps, o.wrong[:1] if isinstance(o.wrong, list) else o.wrong,
                     o.latest_ok)
    assert run.replicas_exited
