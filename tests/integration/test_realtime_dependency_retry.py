"""A dependency read at event T that is missing bars not yet published is retried, not lost (issue 12).

gateway-fn answers a realtime read of a dependency that is not complete up to T with 404 `no_output`
naming the missing bar ends; the gateway client raises DependencyNotPublished for it, the supervisor
marks the result retryable by that type, and the scheduler tries the evaluation again within its
bounded attempts. So a dependent at T reading while another replica is still publishing T-1 gets its
row with the right value once T-1 is out; a dependency that never publishes still ends as
`dependency_failed` (no row, no dead letter) after the attempts. Never an older point as current.

Deterministic, no timing: the other replica's publish is gated and released from inside the
dependent's first (failed) invocation, which waits until the publish is done before it returns.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import psycopg
import pytest

from customscripts.app import app
from customscripts.marketdata.replayer import load_candles
from customscripts.outputs import OutputRow, params_hash
from customscripts.realtime.events import Event
from customscripts.realtime.publisher import Publisher
from tests.integration.realtime_support import drop_subscriptions, rows, subscribe
from tests.integration.registry_support import Caller
from tests.waiting import wait_until

START = 1_298_937_600.0  # 2011-03-01
TIMES_A = "def run(ctx):\n    return float(get_market_data(limit=1).close[-1])\n"
SUM3 = ("def run(ctx):\n    h = get_script_output({a!r}, history=3)\n"
        "    return float(sum(h['columns']['value']))\n")
LATEST_K2 = "def run(ctx):\n    return float(get_script_output({a!r}, params={{'k': 2}})['value']) + 1\n"


@pytest.fixture
def owner(api, uid, stack):
    caller = Caller(api, f"dr-{uid}", f"dr-tenant-{uid}")
    yield caller
    drop_subscriptions(stack, caller.tenant)


@pytest.fixture
def cfg(stack):
    return dataclasses.replace(stack, scheduler_retry_attempts=3, scheduler_retry_backoff_s=0.05)


class _GatedPublisher(Publisher):
    """Another replica's publisher that holds its batch's rows until released."""

    def __init__(self, inner: Publisher) -> None:
        super().__init__(inner.redis, inner.outputs)
        self.entered, self.release, self.done = threading.Event(), threading.Event(), threading.Event()

    def publish_rows(self, rows):
        self.entered.set()
        assert self.release.wait(60)
        try:
            return super().publish_rows(rows)
        finally:
            self.done.set()


def _on_first_retryable(evaluator: Any, script_id: str, action) -> list[int]:
    """Run `action()` inside the first invocation of `script_id` whose answer is retryable, before
    that answer is applied (so the retry certainly comes after it); returns a list counting the
    invocations of `script_id`."""
    inner = evaluator.invocations.invoke
    calls: list[int] = []
    fired = threading.Event()

    def invoke(group, chunk, call_id, data=None):
        answer = inner(group, chunk, call_id, data)
        if group[0] == script_id:
            calls.append(len(chunk))
            if not fired.is_set() and any(r.get("retryable") for r in answer.results):
                fired.set()
                action()
        return answer

    evaluator.invocations.invoke = invoke
    return calls


def _dead_letters(cfg, tenant: str, script_id: str) -> int:
    with psycopg.connect(cfg.pg_dsn) as conn:
        return conn.execute("SELECT count(*) FROM realtime_dead_letters WHERE tenant = %s AND script_id = %s",
                            (tenant, script_id)).fetchone()[0]


def _window_chain(owner: Caller, uid: str) -> tuple[str, str]:
    """A (the close) and B (the sum of A's last three outputs), both subscribed on GOOG 1d."""
    a, b = owner.sid(f"a-{uid}"), owner.sid(f"b-{uid}")
    owner.create_published(a, TIMES_A)
    owner.create_published(b, SUM3.format(a=a), depends_on=[f"{a}@1"])
    for sid in (a, b):
        assert subscribe(owner, sid).status_code == 201
    return a, b


def _closes(cfg) -> tuple[list[float], dict[float, float]]:
    candles = load_candles(cfg, "GOOG", "1d", START, None, 6)
    close = {c["end_time"]: float(c["close"]) for c in candles}
    return sorted(close), close


def test_a_window_another_replica_is_still_publishing_is_retried_and_published_right(owner, cfg, uid):
    """Replica 2 is publishing A at T-1 (held) while replica 1 evaluates B at T, which reads A's last
    three outputs: B's first attempt fails (T-1 missing), T-1 is then published, and the retry
    publishes B at T = A(T-2) + A(T-1) + A(T)."""
    _a, b = _window_chain(owner, uid)
    times, close = _closes(cfg)
    fast, slow = app().evaluator(cfg), app().evaluator(cfg)
    gate = _GatedPublisher(slow.publisher)
    slow.publisher = gate

    def publish_t1() -> None:
        gate.release.set()
        assert gate.done.wait(60)

    calls = _on_first_retryable(fast, b, publish_t1)
    try:
        fast.process([Event("GOOG", "1d", t) for t in times[:4]])  # history up to T-2
        behind = threading.Thread(target=slow.process, args=([Event("GOOG", "1d", times[4])],))
        behind.start()  # replica 2 on T-1: its rows wait at the gate
        assert wait_until(gate.entered.is_set, timeout=60, interval=0.02)
        calls.clear()
        report = fast.process([Event("GOOG", "1d", times[5])])  # replica 1 on T meanwhile
        gate.release.set()
        behind.join(timeout=60)
    finally:
        fast.close()
        slow.close()
    [ev] = [e for n, e in report.results.items() if n.script_id == b]
    assert ev.status == "ok", ev.error
    stored = {t: float(v) for t, _i, _p, v in rows(cfg, owner.tenant, b)}
    assert (calls, report.item_retries, ev.attempts) == ([1, 1], 1, 1), (stored, times)
    for i in range(2, 6):  # every window whole, T's included: no older point taken for a newer one
        assert stored[times[i]] == sum(close[t] for t in times[i - 2:i + 1])
    assert _dead_letters(cfg, owner.tenant, b) == 0


def test_a_window_whose_bar_never_publishes_ends_dependency_failed_after_the_bounded_retries(owner, cfg, uid):
    """A at T-1 is never published: B at T is tried scheduler_retry_attempts times, then is
    `dependency_failed` naming A and the missing bar end; no row, no dead letter, A at T published."""
    a, b = _window_chain(owner, uid)
    times, _close = _closes(cfg)
    evaluator = app().evaluator(cfg)
    calls = _on_first_retryable(evaluator, b, lambda: None)
    try:
        evaluator.process([Event("GOOG", "1d", t) for t in times[:4]])
        calls.clear()
        report = evaluator.process([Event("GOOG", "1d", times[5])])  # T-1 (times[4]) never evaluated
    finally:
        evaluator.close()
    [ev] = [e for n, e in report.results.items() if n.script_id == b]
    assert ev.status == "dependency_failed", ev.error
    assert ev.attempts == cfg.scheduler_retry_attempts and len(calls) == cfg.scheduler_retry_attempts
    assert ev.error["type"] == "DependencyNotPublished" and ev.error["dependency"] == a
    assert times[4] in ev.error["missing_bar_ends"]
    assert times[5] not in {t for t, *_ in rows(cfg, owner.tenant, b)}
    assert times[5] in {t for t, *_ in rows(cfg, owner.tenant, a)}
    assert _dead_letters(cfg, owner.tenant, b) == 0


@pytest.mark.parametrize("appears", [True, False])
def test_a_latest_read_of_an_output_not_yet_published_is_retried(owner, cfg, uid, appears):
    """B reads A's latest output with params {k: 2} (published elsewhere, not B's planned dependency)
    at T: missing at T on the first attempt; published meanwhile -> B's retry reads it (value + 1);
    never published -> dependency_failed after the attempts, never A(k=2) at T-1 taken for T."""
    a, b = owner.sid(f"a-{uid}"), owner.sid(f"l-{uid}")
    owner.create_published(a, TIMES_A)
    owner.create_published(b, LATEST_K2.format(a=a), depends_on=[f"{a}@1"])
    assert subscribe(owner, b).status_code == 201
    times, _close = _closes(cfg)
    evaluator = app().evaluator(cfg)
    publisher = Publisher(evaluator.publisher.redis, evaluator.publisher.outputs)

    def a_k2(t: float, value: float) -> OutputRow:
        return OutputRow(time=t, tenant=owner.tenant, instrument_key="GOOG", timeframe="1d", script_id=a,
                         version=1, params_hash=params_hash({"k": 2}), value=value)

    publisher.publish([a_k2(t, float(i)) for i, t in enumerate(times[:5])])  # up to T-1
    calls = _on_first_retryable(evaluator, b, (lambda: publisher.publish([a_k2(times[5], 42.0)])) if appears
                                else (lambda: None))
    try:
        report = evaluator.process([Event("GOOG", "1d", times[5])])
    finally:
        evaluator.close()
    [ev] = [e for n, e in report.results.items() if n.script_id == b]
    stored = {t: float(v) for t, _i, _p, v in rows(cfg, owner.tenant, b)}
    if appears:
        assert ev.status == "ok" and stored[times[5]] == 43.0 and len(calls) == 2
    else:
        assert ev.status == "dependency_failed" and times[5] not in stored
        assert len(calls) == cfg.scheduler_retry_attempts and times[5] in ev.error["missing_bar_ends"]
