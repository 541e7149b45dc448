"""History: a script's outputs at every bar end of a range (series), and a subscription's backfill.

Why: a built-in indicator has a history from the start; a custom one had only what realtime
published since its subscription. Both runs here compute exactly what realtime would have computed
at each bar end, because they *are* the realtime evaluator (customscripts/realtime/evaluator.py):
one evaluation per (bar end, script version, params), its dependencies added for the same bar end
with params `{}` and run first, its execution token as of that bar end (customscripts/bartime.py:
the bar is visible then, never before), items batched per function in event-time order into
invocations that the script function runs in one sandboxed child per chunk (`Supervisor.execute_batch`),
with the candle windows and the dependencies' outputs of these bar ends prefetched and signed.

* **Series** (`POST /scripts/{id}/series`): nothing is published. The evaluator's publisher only
  collects (`CollectingPublisher`): the realtime publish stays the value of record for its event,
  exactly as one-time executes leave it. A dependency's output at a bar end reaches its dependent
  through the prefetch (what realtime does for the same event); a read the prefetch cannot answer
  (another params, history) goes to gateway-fn, which reads the published history as of that bar end.
  A request evaluates at most the caller's tier's `max_series_bars` bars (the earliest of the range);
  the answer's `next_start` is where the next page starts (null when the range is done). The
  request holds one of its caller's execute leases (registry/concurrency.py) while it runs.
* **Backfill** (`backfill: N` on subscribe): the subscription's last N bar ends before now are
  evaluated and published through the realtime `Publisher`, dependencies first. The subscription
  row exists before the backfill starts, so live events arriving meanwhile are evaluated by the
  scheduler as usual; both paths publish idempotently by event identity (one history row by the
  table's unique key, one stream message and latest value by the publisher's `seen` key, and the
  latest value only moves forward), so an event that both reach is published once: never lost,
  never doubled.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field

from customscripts import ids, logs
from customscripts.auth import Principal
from customscripts.errors import Forbidden, Invalid
from customscripts.execution import Executor, canonical_hash
from customscripts.inputs import parse_body
from customscripts.outputs import OutputRow, params_hash
from customscripts.permissions import tier_of
from customscripts.realtime.evaluator import Evaluator
from customscripts.realtime.events import Event
from customscripts.realtime.prefetch import MarketWindows
from customscripts.realtime.publisher import DeadLetter, Publisher
from customscripts.realtime.recording import BatchReport
from customscripts.realtime.subscriptions import Subscription, principal_snapshot
from customscripts.registry.models import EvaluationTarget, Number

log = logs.get("customscripts.series")

MAX_EPOCH = 4_102_444_800  # 2100-01-01, the execute body's bound

_BAR_ENDS_SQL = """
SELECT extract(epoch FROM end_time)::float8 FROM candles
WHERE instrument_key = %s AND timeframe = %s AND end_time >= %s AND end_time <= %s
ORDER BY end_time LIMIT %s
"""
_LAST_BAR_ENDS_SQL = """
SELECT e FROM (SELECT extract(epoch FROM end_time)::float8 AS e FROM candles
               WHERE instrument_key = %s AND timeframe = %s AND end_time <= %s
               ORDER BY end_time DESC LIMIT %s) w ORDER BY e
"""


class SeriesBody(EvaluationTarget):
    """POST /scripts/{id}/series body."""

    start: Annotated[float, Number] = Field(ge=0, le=MAX_EPOCH, allow_inf_nan=False,
                         description="Epoch seconds: the first bar end evaluated is at or after it.")
    end: Annotated[float | None, Number] = Field(default=None, ge=0, le=MAX_EPOCH, allow_inf_nan=False,
                              description="Epoch seconds: the last bar end evaluated is at or before it "
                                          "(default, and at most, the server's now).")


class SeriesPoint(BaseModel):
    """The output at one bar end, exactly as realtime would have published it."""

    timestamp: float
    status: str
    value: Any = None
    metadata: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class SeriesResponse(BaseModel):
    script_id: str
    version: int
    call_id: str
    instrument_key: str
    timeframe: str
    params_hash: str
    start: float
    end: float
    outputs: list[SeriesPoint] = Field(description="One per bar end of the page, in time order.")
    statuses: dict[str, int]
    next_start: float | None = Field(description="The range goes on: ask again with start = next_start.")


class CollectingPublisher:
    """The evaluator's publisher for a series: keeps outputs in memory, publishes nothing."""

    def __init__(self) -> None:
        self.rows: list[OutputRow] = []
        self.dead_letters: list[DeadLetter] = []

    def publish_rows(self, rows: Sequence[OutputRow]) -> tuple[int, int]:
        ok = [row for row in rows if row.status == "ok"]
        self.rows.extend(ok)
        return len(ok), len(ok)  # every row is "new": dependents may take it from the prefetch

    def publish(self, rows: Sequence[OutputRow]) -> int:
        return self.publish_rows(rows)[0]

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self.dead_letters.extend(letters)


def bar_ends(pool: ConnectionPool, instrument_key: str, timeframe: str, start: float, end: float,
             limit: int) -> list[float]:
    """The bar ends in [start, end], earliest first, at most `limit` (read-only role)."""
    with pool.connection() as conn:
        rows = conn.execute(_BAR_ENDS_SQL, (instrument_key, timeframe, _dt(start), _dt(end), limit)).fetchall()
    return [r[0] for r in rows]


def last_bar_ends(pool: ConnectionPool, instrument_key: str, timeframe: str, as_of: float,
                  count: int) -> list[float]:
    """The last `count` bar ends at or before `as_of`, earliest first."""
    with pool.connection() as conn:
        rows = conn.execute(_LAST_BAR_ENDS_SQL, (instrument_key, timeframe, _dt(as_of), count)).fetchall()
    return [r[0] for r in rows]


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def due_at(sub: Subscription, times: Sequence[float]) -> list[tuple[Event, Subscription]]:
    """The subscription due at each of these bar ends (what a candle close there would make due)."""
    return [(Event(sub.instrument_key, sub.timeframe, t), sub) for t in times]


class History:
    """Series runs and backfills over the realtime evaluator (one per registry-fn process)."""

    def __init__(self, executor: Executor, reader: ConnectionPool, publisher: Publisher | None = None) -> None:
        self.executor = executor
        self.invoker = executor.invoker
        self.cfg = executor.cfg
        self.reader = reader
        self.market = MarketWindows(reader)
        self.publisher = publisher

    def _evaluator(self, publisher: Any, audit_action: str | None) -> Evaluator:
        # one per run: its breakers, learnt window sizes and pools are this run's alone
        return Evaluator(self.invoker, None, publisher, self.cfg, workers=2,  # type: ignore[arg-type]
                         market=self.market, audit_action=audit_action)

    def run(self, due: Sequence[tuple[Event, Subscription]], publisher: Any, call_id: str,
            audit_action: str | None) -> BatchReport:
        """Evaluate `due` (dependencies first) and publish through `publisher`."""
        evaluator = self._evaluator(publisher, audit_action)
        try:
            return evaluator.process([event for event, _ in due], due=due, call_id=call_id)
        finally:
            evaluator.close()

    # ------------------------------------------------------------------ series

    def precheck(self, principal: Principal, script_id: str, call_id: str | None = None) -> None:
        """404 for an unknown or invisible script, 403 without the right to its latest version (the
        script's current policy), before the body is read: nobody learns more from a bad body."""
        tier_of(principal, self.cfg)
        row = self.invoker.registry.visible_script(principal, script_id, cached=True)
        if not row.latest_version:
            return
        try:
            self.invoker.registry.check_execution(principal, script_id, row.latest_version, row)
        except Forbidden as exc:  # an attempt: audited like a denied execute
            self.invoker.registry.catalog.audit(action="series", script_id=script_id, version=row.latest_version,
                                                user_id=principal.user_id, tenant=principal.tenant, status="denied",
                                                call_id=call_id, detail=exc.message[:500])
            raise

    def series(self, principal: Principal, script_id: str, raw_body: dict[str, Any], call_id: str) -> dict:
        received = time.time()
        tier = tier_of(principal, self.cfg)
        ids.script_id(script_id)
        body = parse_body(SeriesBody, raw_body, "series")
        instrument, timeframe = ids.instrument_key(body.instrument_key), ids.timeframe(body.timeframe)
        end = received if body.end is None else min(body.end, received)
        if body.start > end:
            raise Invalid("start is after end (or after the server's now)", code="invalid_range",
                          details={"start": body.start, "end": end})
        if tier.max_series_bars < 1:
            raise Forbidden(f"tier {tier.name!r} has no series runs", code="series_not_allowed")
        registry = self.invoker.registry
        version = body.version or registry.latest_published(registry.visible_script(principal, script_id, cached=True))
        p_hash = params_hash(body.params)
        audit = functools.partial(self.invoker.registry.catalog.audit, action="series", script_id=script_id,
                                  version=version, user_id=principal.user_id, tenant=principal.tenant,
                                  call_id=call_id, params_hash=p_hash)
        try:
            self.invoker.registry.check_execution(principal, script_id, version)
        except Forbidden as exc:
            audit(status="denied", detail=exc.message[:500])
            raise
        self.invoker.check_params(script_id, version, body.params)
        times = bar_ends(self.reader, instrument, timeframe, body.start, end, tier.max_series_bars + 1)
        page, rest = times[:tier.max_series_bars], times[tier.max_series_bars:]
        sub = Subscription(0, principal.tenant, principal.user_id, script_id, version, instrument, timeframe,
                           body.params, p_hash, principal_snapshot(principal))
        collected = CollectingPublisher()
        report: BatchReport | None = None
        if page:
            with self.executor.slots.hold(principal, tier, self.cfg.series_lease_s, call_id):
                report = self.run(due_at(sub, page), collected, call_id, audit_action=None)
        outputs = _points(report, script_id, version, p_hash, page)
        statuses: dict[str, int] = {}
        for point in outputs:
            statuses[point["status"]] = statuses.get(point["status"], 0) + 1
        audit(status="ok" if statuses.keys() <= {"ok"} else "error",
              output_hash=canonical_hash([p.get("value") for p in outputs]) if outputs else None,
              detail=f"series of {len(page)} bars: {statuses}"[:500])
        logs.event(log, "series", script_id=script_id, version=version, bars=len(page), statuses=statuses)
        return {"script_id": script_id, "version": version, "call_id": call_id, "instrument_key": instrument,
                "timeframe": timeframe, "params_hash": p_hash, "start": body.start, "end": end,
                "outputs": outputs, "statuses": statuses, "next_start": rest[0] if rest else None}

    # ------------------------------------------------------------------ backfill

    def backfill(self, sub: Subscription, principal: Principal, count: int, call_id: str,
                 as_of: float | None = None) -> dict[str, Any]:
        """Publish the subscription's outputs at its last `count` bar ends at or before `as_of` (now)."""
        if self.publisher is None:
            raise RuntimeError("backfill needs the realtime publisher")
        as_of = time.time() if as_of is None else as_of
        times = last_bar_ends(self.reader, sub.instrument_key, sub.timeframe, as_of, count) if count else []
        if not times:
            return {"requested": count, "bars": 0, "published": 0, "statuses": {}}
        tier = tier_of(principal, self.cfg)
        with self.executor.slots.hold(principal, tier, self.cfg.series_lease_s, call_id):
            report = self.run(due_at(sub, times), self.publisher, call_id, audit_action="backfill")
        roots = [ev for node, ev in report.results.items() if ev.subscriptions]
        statuses: dict[str, int] = {}
        for ev in roots:
            statuses[ev.status] = statuses.get(ev.status, 0) + 1
        return {"requested": count, "bars": len(times), "published": report.published, "statuses": statuses,
                "from": times[0], "to": times[-1]}


def _points(report: BatchReport | None, script_id: str, version: int, p_hash: str,
            times: Sequence[float]) -> list[dict[str, Any]]:
    """The root evaluation's result at each bar end, in time order."""
    found: dict[float, Any] = {}
    if report is not None:
        for node, ev in report.results.items():
            if (node.script_id, node.version, node.params_hash) == (script_id, version, p_hash) and ev.subscriptions:
                found[node.time] = ev
    points = []
    for t in times:
        ev = found.get(t)
        if ev is None:  # denied before planning (the closure changed under us): nothing ran
            points.append({"timestamp": t, "status": "denied", "error": {"type": "Denied",
                                                                           "message": "not allowed to run"}})
        elif ev.status == "ok" and ev.row is not None:
            points.append({"timestamp": t, "status": "ok", "value": ev.row.value, "metadata": ev.row.metadata or {}})
        else:
            points.append({"timestamp": t, "status": ev.status, "error": ev.error})
    return points


def fetch_series(base_url: str, token: str, script_id: str, body: dict[str, Any], *,
                 progress: Any = None, timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """Client side of a long range: POST /scripts/{id}/series page after page (following
    `next_start`) and return every output in time order; `progress(done_bars, last_timestamp)` is
    called after each page (what a CLI shows). Raises on a non-200 answer."""
    import requests

    outputs: list[dict[str, Any]] = []
    page = dict(body)
    while True:
        resp = requests.post(f"{base_url}/scripts/{script_id}/series", json=page, timeout=timeout_s,
                             headers={"Authorization": f"Bearer {token}"})
        if resp.status_code != 200:
            raise RuntimeError(f"series answered {resp.status_code}: {resp.text[:300]}")
        answer = resp.json()
        outputs.extend(answer["outputs"])
        if progress is not None:
            progress(len(outputs), outputs[-1]["timestamp"] if outputs else None)
        if answer["next_start"] is None:
            return outputs
        page = {**page, "start": answer["next_start"]}


