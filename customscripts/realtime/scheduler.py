"""The realtime scheduler: candle-close events in, published indicator outputs out.

Flow for every batch fetched from the JetStream durable pull consumer (replicas share the durable
name, so they share the work):

1. parse the events (candle closes, timer ticks); find the due subscriptions in one query;
2. check each subscriber's permission on the version and its dependency closure *now* (with the
   claims snapshot taken at subscribe time): a lost entitlement makes the evaluation `denied`;
3. build evaluations — one per (tenant, script version, params, instrument, timeframe, event time),
   shared by every subscriber of the tenant that asks for it (outputs belong to the tenant, not to a
   user; it runs once, for one of them) — and add each one's dependencies for the same event with
   params `{}`; each evaluation's *audience* is the set of users whose subscriptions read its output;
4. fetch, in one query, the candle windows of every instrument a market-reading script of the batch
   is evaluated on (customscripts.realtime.prefetch);
5. run the evaluations in dependency order (`waves.Frontier`): an evaluation is invoked as soon as its
   own dependencies are published, batched with the ready evaluations of the same function, tenant,
   principal and audience into one invocation (`{"items": [...]}` in event-time order; an item carries
   its own execution token only when its as-of time differs from the batch's; `prefetch`: the candle
   windows and the outputs of the items' direct dependencies for these events, MAC-signed, answered by
   the function's supervisor instead of gateway-fn when provably identical). Invocations run in
   parallel; each answer is validated as it arrives, outputs a later evaluation reads are published
   before it is invoked — so a dependent reading its dependency's output "as of the event" reads this
   event's value — and the others in the background;
6. a dependent of a dependency that did not produce an ok output for this event is
   `dependency_failed` and is never invoked (it would otherwise read the previous event's value);
7. only after every output and dead letter is recorded — committed synchronously, on disk (see
   publisher.py) — are the NATS messages acknowledged.

Stopping (SIGTERM, `Scheduler.stop`): nothing more is fetched; the batch under way gets
`scheduler_stop_grace_s` to finish and be acknowledged, else its messages are naked (redelivered to
another replica at once; publishing is idempotent) and the process leaves without waiting for it.

Batching. Items of one invocation run in one sandboxed child, one after another, and share its module
state. So a child holds the items of one principal (user and tier: the group key), and of one
audience: a private evaluation never shares a child with one whose output other users read, nor with
another user's, so no user's params can reach an output another user reads. Items run in event-time
order: nothing a script read for a later event can be kept for an earlier one.

Failures stay inside their function and tenant. Whether a failure is transient is decided on the
trusted side only: the supervisor's `retryable` flag (by the type of what it saw itself: a data
gateway outage, or a dependency read missing bars not yet published — another replica may be
publishing T-1 right now; still missing after the attempts, it is final `dependency_failed`, not a
dead letter) or the invocation itself failing (function unreachable, non-200, malformed answer, wrong result
count, past its deadline). What a script raises or prints never counts: it is that evaluation's
`error`. Every answer publishes what succeeded; only the failed items are tried again, up to
`scheduler_retry_attempts` with exponential backoff, then dead-lettered: status `error` naming the
dead letter, a row in `realtime_dead_letters` (Publisher.dead_letter), the audit row every
evaluation gets, `cs_realtime_dead_letters_total`; their dependents are `dependency_failed`; the
events are acknowledged. Only a failure of the platform's own publishing (PostgreSQL, Redis) leaves
the batch unacknowledged (nak with delay); publishing is idempotent, so nothing is lost or doubled.

Bounding a hostile function (`Breakers`, per function and tenant). A function new to this replica,
or one whose last invocation timed out or failed, gets one single-item invocation at a time (a probe)
until one is clean (answered, no timeout). Timeouts and failed invocations are strikes; a clean
invocation forgives one, so mixing ok items into timeouts does not escape it.
`scheduler_breaker_strikes` strikes — or one invocation past its deadline — open the breaker: for the
cool-down (doubled on each opening, until the function stays clean for the longest cool-down) its
items of that tenant are dead-lettered at once (`circuit_open`) without invoking it, then one probe
decides. Healthy functions get chunks sized to take about half the invocation deadline at the
per-item time they last took. So a function that holds its timeout on every event costs a batch at
most `strikes` item timeouts, then nothing until its cool-down ends; one that mixes timeouts into
ok answers is opened as soon as its timeouts outnumber its clean invocations by `strikes`; and since
evaluations run by their own dependencies, not in global waves, its slowness delays only its own
dependents and the batch's acknowledgement.

Latency: event -> published = queued (JetStream, the fetch, the batch before this one: `queued_s`)
+ work (plan, prefetch, invocations and their publishing). The report and RunStats keep both.

Timer events: with `CS_SCHEDULER_TIMERS=1m,1h` every replica publishes a tick on
`{nats_subject_prefix}._timer.{tf}` at each timeframe boundary, with a Nats-Msg-Id of the boundary so
JetStream keeps one per boundary; a tick evaluates every subscription on that timeframe as of the
boundary. Its event identity equals a candle close at the same time, so both at once publish once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from customscripts import ids, logs
from customscripts.auth import Principal
from customscripts.bartime import bar_end, last_close
from customscripts.config import Settings, settings
from customscripts.errors import ApiError
from customscripts.execution import Invoker, Scope, canonical_hash, check_result, error_detail
from customscripts.faas.naming import function_name
from customscripts.outputs import OutputRow, params_hash
from customscripts.realtime import metrics
from customscripts.realtime.prefetch import DEFAULT_BARS, MAX_BARS, MarketWindows, Window, encode, output_entry
from customscripts.realtime.publisher import DeadLetter, Publisher
from customscripts.realtime.subscriptions import Subscription, SubscriptionStore
from customscripts.realtime.waves import Frontier
from customscripts.registry.audit import AuditRow
from customscripts.sandbox.invocation import sign_prefetch

log = logs.get("customscripts.scheduler")

TIMER_TOKEN = "_timer"
BUDGET_RECHECK_S = 60.0
_NO_PARAMS = params_hash({})  # dependencies are evaluated with params {}
MAX_WINDOWS_PER_CALL = 256  # prefetched candle windows per invocation
PREFETCH_BYTES = 4 << 20  # and at most about this much of them: bodies stay well under the function's 8 MiB
GIVE_UP_AFTER_DELIVERIES = 50  # a publishing failure that lasts this long is logged and dropped
DEADLINE_MARGIN_S = 5.0  # on top of its items' timeouts, for an invocation's cold start
# why an evaluation was dead-lettered -> its error type
DEAD_LETTER_TYPES = {"invocation_failed": "InvocationFailed", "data_source_unavailable": "DataSourceUnavailable",
                     "circuit_open": "CircuitOpen"}


@dataclass(frozen=True)
class Event:
    """A candle close (or timer tick) for one instrument and timeframe at `time` (epoch s): the closed
    bar's end, which evaluations read as of and outputs are stamped with."""

    instrument_key: str
    timeframe: str
    time: float
    received: float = field(default=0.0, compare=False)  # when it entered JetStream (latency origin)


class Node(NamedTuple):
    """One evaluation: a script version with params, for one tenant, on one event (a tuple: planning
    builds and hashes thousands per batch)."""

    tenant: str
    script_id: str
    version: int
    params_hash: str
    instrument_key: str
    timeframe: str
    time: float

    def __str__(self) -> str:
        return f"{self.tenant}/{self.script_id}@{self.version}/{self.params_hash}/{self.instrument_key}/{self.time}"


@dataclass
class Evaluation:
    node: Node
    params: dict[str, Any]
    principal: Principal
    closure: list[tuple[str, int]]
    subscriptions: list[int] = field(default_factory=list)
    status: str = "pending"
    error: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # duration_ms, cpu_ms, memory_mb as the function measured
    output_hash: str | None = None
    audience: set[str] = field(default_factory=set)  # users whose subscriptions read this output
    group: tuple = ()  # what may share a sandboxed child with it: see Evaluator._group
    attempts: int = 0  # failed attempts in this batch (invocation failed, or retryable)
    not_before: float = 0.0  # monotonic time of the next attempt
    row: OutputRow | None = None  # the output, once ok


@dataclass
class BatchReport:
    events: int = 0
    evaluations: int = 0
    statuses: Counter = field(default_factory=Counter)
    published: int = 0
    item_retries: int = 0  # evaluations tried again in this batch
    dead_letters: list[Evaluation] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # event received -> published, per evaluation
    queued_s: list[float] = field(default_factory=list)  # event received -> batch started, per evaluation
    results: dict[Node, Evaluation] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)  # plan, prefetch, run, publish...: where time goes
    prefetched_reads: int = 0  # reads the functions answered from what the batch sent along
    denied: list[tuple[Subscription, Principal, str]] = field(default_factory=list)  # due, not allowed to run
    call_id: str = ""


@dataclass
class BatchData:
    """What one batch's invocations may be sent along (see customscripts.realtime.prefetch)."""

    deps: dict[Node, list[Node]] = field(default_factory=dict)
    windows: dict[tuple[str, str], Window] = field(default_factory=dict)
    events: dict[tuple[str, str], int] = field(default_factory=dict)  # distinct event times per window
    outputs: dict[Node, dict[str, Any]] = field(default_factory=dict)  # published in this batch, fresh
    trimmed: dict[tuple[tuple[str, str], int], Window] = field(default_factory=dict)
    prefetched_reads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_outputs(self, rows: Iterable[OutputRow]) -> None:
        for row in rows:
            entry = output_entry(row)
            if entry is not None:
                self.outputs[_node_of(row)] = entry


def _node_of(row: OutputRow) -> Node:
    return Node(row.tenant, row.script_id, row.version, row.params_hash, row.instrument_key, row.timeframe,
                float(row.time))


class InvocationFailed(Exception):
    """The invocation itself failed (unreachable, non-200, malformed answer, wrong result count, past
    its deadline): the trusted side saw it, so its items are retried. `deadline`: it held its caller
    for the whole deadline."""

    def __init__(self, message: str, *, deadline: bool = False) -> None:
        super().__init__(message)
        self.deadline = deadline


class Answer(NamedTuple):
    """A function's checked results for one invocation's items, in order, and how long it took."""

    results: list[dict[str, Any]]
    seconds: float


@dataclass
class _Breaker:
    strikes: int = 0  # timeouts and failed invocations, less one per clean invocation since
    proven: bool = False  # its last invocation was clean: full chunks, no probe
    open_until: float = 0.0
    opened_at: float = float("-inf")
    opens: int = 0  # openings not yet forgiven: the cool-down doubles with each
    per_item_s: float | None = None  # what an item took in its last clean invocation


class Breakers:
    """Circuit breakers per function and tenant (`(script_id, version, tenant)`), in this replica's
    memory (a new replica probes every function once). See the module docstring."""

    def __init__(self, cfg: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._state: dict[tuple[str, int, str], _Breaker] = {}
        self._lock = threading.Lock()

    def _get(self, key: tuple[str, int, str]) -> _Breaker:
        with self._lock:
            b = self._state.get(key)
            if b is None:
                b = self._state[key] = _Breaker()
            return b

    def is_open(self, key: tuple[str, int, str]) -> bool:
        return self.clock() < self._get(key).open_until

    def proven(self, key: tuple[str, int, str]) -> bool:
        return self._get(key).proven

    def chunk_cap(self, key: tuple[str, int, str], deadline_s: float) -> int:
        """Items per invocation so that one takes about half its deadline at the last per-item time."""
        per_item = self._get(key).per_item_s
        if not per_item:
            return self.cfg.scheduler_max_items
        return max(1, min(self.cfg.scheduler_max_items, int(deadline_s / 2 / per_item)))

    def success(self, key: tuple[str, int, str], per_item_s: float) -> None:
        """A clean invocation (answered, no item timed out): one strike forgiven, so a function that
        mixes timeouts into its answers still adds up to an opening; its openings are forgiven once
        it stayed clean for the longest cool-down."""
        b = self._get(key)
        b.strikes = max(0, b.strikes - 1)
        if self.clock() - b.opened_at >= self.cfg.scheduler_breaker_cooldown_max_s:
            b.opens = 0
        b.proven = True
        b.per_item_s = per_item_s

    def strike(self, key: tuple[str, int, str], *, hard: bool = False) -> None:
        """A timeout or a failed invocation; `hard` (past the deadline) opens the breaker at once."""
        b = self._get(key)
        b.strikes += 1
        b.proven = False
        if hard or b.strikes >= self.cfg.scheduler_breaker_strikes:
            cool = min(self.cfg.scheduler_breaker_cooldown_max_s, self.cfg.scheduler_breaker_cooldown_s * 2 ** b.opens)
            b.opened_at = self.clock()
            b.open_until = b.opened_at + cool
            b.opens += 1
            metrics.BREAKER_OPENED.inc()
            logs.event(log, "realtime circuit breaker opened", script_id=key[0], version=key[1], tenant=key[2],
                       strikes=b.strikes, cooldown_s=cool)


def parse_event(subject: str, data: bytes, received: float = 0.0) -> list[Event]:
    """A candle-close message → one event at the candle's end (its `end_time`, else computed from its
    start `time`: bartime.bar_end, the one rule); a timer tick (its time is a boundary, the end of the
    bar that just closed) → one event per instrument resolved later."""
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("event is not a JSON object")
    t = float(body["time"])
    if not math.isfinite(t):
        raise ValueError("event time is not finite")
    timeframe = ids.timeframe(body["timeframe"])
    if body.get("timer"):
        return [Event("", timeframe, t, received)]
    end = bar_end(t, timeframe)
    if body.get("end_time") is not None and abs(float(body["end_time"]) - end) >= 1e-6:
        raise ValueError(f"event end_time {body['end_time']!r} is not its bar's end {end!r}")
    return [Event(ids.instrument_key(body["instrument_key"]), timeframe, end, received)]


class Evaluator:
    """Synchronous core of the scheduler: a batch of events in, published outputs and a report out."""

    def __init__(self, invoker: Invoker, subscriptions: SubscriptionStore, publisher: Publisher,
                 cfg: Settings | None = None, workers: int | None = None, *,
                 market: MarketWindows | None = None, prefetch: bool = True,
                 audit_action: str | None = "realtime") -> None:
        self.cfg = cfg or settings()
        # each evaluation's audit row names this action (series and backfill runs reuse the evaluator
        # with their own); None: no row per evaluation (the caller writes its own)
        self.audit_action = audit_action
        self.market = market  # None: no candle windows are prefetched (reads go to the gateway)
        self.prefetch = prefetch  # False: send nothing along, every read goes to the gateway
        self.invoker = invoker
        self.registry = invoker.registry
        self.subscriptions = subscriptions
        self.publisher = publisher
        self.pool = ThreadPoolExecutor(max_workers=workers or self.cfg.scheduler_workers,
                                       thread_name_prefix="cs-sched-invoke")
        self._publishing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-sched-publish")
        self._closures: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self._market_readers: dict[tuple[str, int], bool] = {}
        self._bars: dict[tuple[str, int], int] = {}  # candles a version's reads need, as its functions report
        self._phashes: dict[int, tuple[dict[str, Any], str]] = {}
        self._principals: dict[int, tuple[dict[str, Any], Principal]] = {}
        self._direct: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self._item_timeouts: dict[tuple[str, int], float] = {}
        self.breakers = Breakers(self.cfg)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._publishing.shutdown(wait=True)  # a publish under way finishes: its events are not acked

    # ------------------------------------------------------------------ planning

    def _due(self, events: Sequence[Event]) -> list[tuple[Event, Subscription]]:
        candles = [e for e in events if e.instrument_key]
        ticks = [e for e in events if not e.instrument_key]
        subs = self.subscriptions.due_many({(e.instrument_key, e.timeframe) for e in candles})
        by_key: dict[tuple[str, str], list[Subscription]] = defaultdict(list)
        for s in subs:
            by_key[(s.instrument_key, s.timeframe)].append(s)
        due = [(e, s) for e in candles for s in by_key.get((e.instrument_key, e.timeframe), ())]
        if ticks:
            for tick in ticks:
                for s in self.subscriptions.due_timeframe(tick.timeframe):
                    due.append((Event(s.instrument_key, s.timeframe, tick.time, tick.received), s))
        return due

    def plan(self, events: Sequence[Event], report: BatchReport,
             due: Sequence[tuple[Event, Subscription]] | None = None
             ) -> tuple[dict[Node, Evaluation], dict[Node, list[Node]]]:
        """Due subscriptions (those of the events, or `due` as given: a series or a backfill) →
        evaluations (deduplicated per tenant) and their dependency edges."""
        allowed: dict[tuple, list[tuple[str, int]] | ApiError] = {}
        evals: dict[Node, Evaluation] = {}
        deps: dict[Node, list[Node]] = {}
        for event, sub in (self._due(events) if due is None else due):
            principal = self._principal(sub)
            key = (principal, sub.script_id, sub.version)
            if key not in allowed:
                try:
                    allowed[key] = self.registry.check_execution(principal, sub.script_id, sub.version)
                except ApiError as exc:  # 403/404/422: this subscriber may not run it any more
                    allowed[key] = exc
            closure = allowed[key]
            if isinstance(closure, ApiError):
                report.statuses["denied"] += 1
                report.denied.append((sub, principal, closure.message[:500]))
                metrics.EVALUATIONS.labels("denied").inc()
                logs.event(log, "realtime evaluation denied", subscription=sub.id, script_id=sub.script_id,
                           version=sub.version, user=sub.user_id, reason=closure.message[:200])
                continue
            root = self._add(evals, deps, sub.tenant, sub.script_id, sub.version, sub.params, event, principal,
                             closure, self._params_hash(sub))
            evals[root].subscriptions.append(sub.id)
            evals[root].audience.add(sub.user_id)
        self._group(evals, deps)
        return evals, deps

    @staticmethod
    def _group(evals: dict[Node, Evaluation], deps: dict[Node, list[Node]]) -> None:
        """Each evaluation's audience (the users whose subscriptions read its output, through
        dependents too) and its group: function, tenant, the principal it runs for and its audience.
        Only evaluations of one group share a sandboxed child (module state): one user's params never
        reach an output another user reads, and an output several users read is never computed next
        to one user's private evaluations."""
        for root in [ev for ev in evals.values() if ev.audience]:
            stack = list(deps.get(root.node, ()))
            while stack:
                dep = evals[stack.pop()]
                if not root.audience <= dep.audience:
                    dep.audience |= root.audience
                    stack.extend(deps.get(dep.node, ()))
        for ev in evals.values():
            n, p = ev.node, ev.principal
            ev.group = (n.script_id, n.version, n.tenant, p.user_id, p.tier, frozenset(ev.audience))

    def _add(self, evals: dict[Node, Evaluation], deps: dict[Node, list[Node]], tenant: str, script_id: str,
             version: int, params: dict[str, Any], event: Event, principal: Principal,
             closure: list[tuple[str, int]], phash: str = _NO_PARAMS) -> Node:
        node = Node(tenant, script_id, version, phash, event.instrument_key, event.timeframe, event.time)
        if node in evals:
            return node
        evals[node] = Evaluation(node, params, principal, closure)
        children = [self._add(evals, deps, tenant, dep_id, dep_ver, {}, event, principal,
                              self._closure_of(dep_id, dep_ver))
                    for dep_id, dep_ver in self._dependencies(script_id, version)]
        deps[node] = children
        return node

    def _dependencies(self, script_id: str, version: int) -> list[tuple[str, int]]:
        """A published version's direct dependencies (immutable: parsed once)."""
        key = (script_id, version)
        deps = self._direct.get(key)
        if deps is None:
            deps = self._direct[key] = list(self.invoker.version(script_id, version)[0].dependencies())
        return deps

    def _principal(self, sub: Subscription) -> Principal:
        """The subscriber's claims snapshot as a Principal, built once per subscription and snapshot."""
        cached = self._principals.get(sub.id)
        if cached is None or cached[0] != sub.principal or cached[1].user_id != sub.user_id \
                or cached[1].tenant != sub.tenant:
            cached = (sub.principal, sub.as_principal())
            self._principals[sub.id] = cached
        return cached[1]

    def _params_hash(self, sub: Subscription) -> str:
        """A subscription's params hash, computed once per subscription and params (a hot loop)."""
        cached = self._phashes.get(sub.id)
        if cached is None or cached[0] != sub.params:
            cached = (sub.params, params_hash(sub.params))
            self._phashes[sub.id] = cached
        return cached[1]

    def _closure_of(self, script_id: str, version: int) -> list[tuple[str, int]]:
        """A published version's dependency closure from its (immutable, cached) metas; itself last."""
        key = (script_id, version)
        if key not in self._closures:
            order: list[tuple[str, int]] = []
            for dep in self._dependencies(script_id, version):
                order.extend(c for c in self._closure_of(*dep) if c not in order)
            self._closures[key] = [*order, key]
        return self._closures[key]

    # ------------------------------------------------------------------ running

    def process(self, events: Sequence[Event], due: Sequence[tuple[Event, Subscription]] | None = None,
                call_id: str | None = None) -> BatchReport:
        """Evaluate and publish everything due for `events` (or exactly `due`: the evaluations of a
        series or a backfill, at their own events); record what had to be given up. Raises only when
        publishing (PostgreSQL, Redis) failed: then the events must be redelivered."""
        report = BatchReport(events=len(events))
        started = time.time()  # before: queueing (JetStream, fetch, the previous batch); after: work
        events = list(dict.fromkeys(events))
        received = {(e.instrument_key, e.timeframe, e.time): e.received for e in events}
        t0 = time.perf_counter()
        evals, deps = self.plan(events, report, due)
        report.timings_s["plan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = BatchData(deps=deps)
        self._windows(evals.values(), data)
        report.timings_s["prefetch"] = time.perf_counter() - t0
        report.call_id = call_id or uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        _BatchRun(self, evals, deps, data, report, received, started).run()
        report.timings_s["run"] = time.perf_counter() - t0
        self._dead_letter(report)
        for ev in evals.values():
            report.statuses[ev.status] += 1
            metrics.EVALUATIONS.labels(ev.status).inc()
        report.evaluations = len(evals)
        report.prefetched_reads = data.prefetched_reads
        report.results = evals
        for latency in report.latencies_s:
            metrics.LATENCY.observe(latency)
        for queued in report.queued_s:
            metrics.QUEUED.observe(queued)
        self._audit(report)
        return report

    def _dead_letter(self, report: BatchReport) -> None:
        """Record the evaluations given up on (before the events are acknowledged)."""
        letters = [DeadLetter(ev.node.tenant, ev.principal.user_id, ev.node.script_id, ev.node.version,
                              ev.node.params_hash, ev.node.instrument_key, ev.node.timeframe, ev.node.time,
                              ev.error["dead_letter"], error_detail(ev.error) or "", ev.attempts, report.call_id)
                   for ev in report.dead_letters if ev.error]
        self.publisher.dead_letter(letters)
        for letter in letters:
            metrics.DEAD_LETTERS.labels(letter.reason).inc()
            logs.event(log, "realtime evaluation dead-lettered", tenant=letter.tenant, script_id=letter.script_id,
                       version=letter.version, instrument_key=letter.instrument_key, time=letter.time,
                       reason=letter.reason, attempts=letter.attempts, error=letter.error[:300])

    def _audit(self, report: BatchReport) -> None:
        """One audit row per evaluation of a batch that was published (denied ones included), written
        off the batch's path by the registry's AuditWriter."""
        action = self.audit_action
        if action is None:
            return
        log_rows = self.registry.catalog.audit_log.submit
        for ev in report.results.values():
            n = ev.node
            log_rows(AuditRow(report.call_id, n.script_id, n.version, ev.principal.user_id, n.tenant, action,
                              ev.status, error_detail(ev.error), n.params_hash, ev.output_hash,
                              ev.metrics.get("duration_ms"), ev.metrics.get("cpu_ms"), ev.metrics.get("memory_mb")))
        for sub, principal, reason in report.denied:
            log_rows(AuditRow(report.call_id, sub.script_id, sub.version, principal.user_id, sub.tenant, action,
                              "denied", reason, self._params_hash(sub)))

    def _publish(self, rows: list[OutputRow], data: BatchData, report: BatchReport,
                 received: dict[tuple[str, str, float], float], started: float) -> None:
        """Publish outputs dependents of this batch read: they become prefetchable if all were new."""
        new, inserted = self.publisher.publish_rows(rows)
        report.published += new
        if self.prefetch and inserted == len(rows):  # all fresh: exactly what the gateway now reads
            data.add_outputs(rows)
        self._record(rows, time.time(), report, received, started)

    def _publish_later(self, rows: list[OutputRow]) -> tuple[list[OutputRow], int, float, float]:
        t0 = time.perf_counter()
        new, _ = self.publisher.publish_rows(rows)
        return rows, new, time.time(), time.perf_counter() - t0

    @staticmethod
    def _record(rows: list[OutputRow], done: float, report: BatchReport,
                received: dict[tuple[str, str, float], float], started: float) -> None:
        for row in rows:
            t0 = received.get((row.instrument_key, row.timeframe, float(row.time)))
            if t0:
                report.latencies_s.append(done - t0)
                report.queued_s.append(max(0.0, started - t0))

    # ------------------------------------------------------------------ prefetch

    def _reads_market(self, script_id: str, version: int) -> bool:
        """Whether a version's source mentions get_market_data: only then are candle windows sent
        along. A script that reaches the API another way simply reads through the gateway."""
        key = (script_id, version)
        if key not in self._market_readers:
            self._market_readers[key] = "get_market_data" in self.invoker.version(script_id, version)[1]
        return self._market_readers[key]

    def _bars_for(self, script_id: str, version: int) -> int:
        return min(self._bars.get((script_id, version), DEFAULT_BARS), MAX_BARS)

    def _windows(self, evals: Iterable[Evaluation], data: BatchData) -> None:
        """The candle windows of every instrument a market-reading evaluation of the batch is on, as
        long as the longest read of those versions plus the batch's events, in one query; on a
        database error none (the scripts then read through the gateway)."""
        if not self.prefetch or self.market is None:
            return
        times: dict[tuple[str, str], set[float]] = defaultdict(set)
        bars: dict[tuple[str, str], int] = defaultdict(int)
        for ev in evals:
            n = ev.node
            if self._reads_market(n.script_id, n.version):
                key = (n.instrument_key, n.timeframe)
                times[key].add(n.time)
                bars[key] = max(bars[key], self._bars_for(n.script_id, n.version))
        if not times:
            return
        data.events = {k: len(v) for k, v in times.items()}
        try:
            data.windows = self.market.fetch({k: (max(v), bars[k] + len(v)) for k, v in times.items()})
        except Exception as exc:  # the read path still works without it
            logs.event(log, "prefetching candle windows failed; scripts read through the gateway",
                       error=repr(exc)[:200])

    def _prefetch(self, script_id: str, version: int, tenant: str, chunk: list[Evaluation],
                  data: BatchData) -> str | None:
        """The prefetch `data` for one invocation: the chunk's candle windows (if the script reads
        market data) and the outputs of its direct dependencies for these events - only what each
        item's token may read, and only where the gateway's answer is unambiguous."""
        windows: dict[tuple[str, str], Window] = {}
        if data.windows and self._reads_market(script_id, version):
            bars = self._bars_for(script_id, version)
            for ev in chunk:
                key = (ev.node.instrument_key, ev.node.timeframe)
                if key in data.windows and key not in windows:
                    m = bars + data.events.get(key, 0)
                    with data.lock:  # one trimmed copy (and base64 text) per length, shared by functions
                        cut = data.trimmed.get((key, m))
                        if cut is None:
                            cut = data.trimmed[(key, m)] = data.windows[key].last(m)
                    windows[key] = cut
        outputs: dict[Node, dict[str, Any]] = {}
        if data.outputs:
            for ev in chunk:
                for dep in data.deps.get(ev.node, ()):
                    entry = data.outputs.get(dep)
                    if entry is None or dep.tenant != tenant or dep.time != ev.node.time:
                        continue
                    if [v for s, v in ev.closure if s == dep.script_id] != [dep.version]:
                        continue  # several versions readable: the gateway picks one; let it
                    outputs[dep] = entry
        if not windows and not outputs:
            return None
        return encode(tenant, windows.values(), outputs.values())

    def _chunks(self, key: tuple, group: list[Evaluation], cap: int | None = None) -> list[list[Evaluation]]:
        """At most `cap` (default scheduler_max_items) items per invocation and, for market readers, at most
        MAX_WINDOWS_PER_CALL instruments and PREFETCH_BYTES of candle windows. Items go in event-time
        order: one child runs them one after another with shared module state, so an item must never
        run after one with a later as-of (whatever it read could otherwise be kept for an earlier event:
        lookahead)."""
        size = cap or self.cfg.scheduler_max_items
        group = sorted(group, key=lambda ev: ev.node.time)  # stable: otherwise in event order
        if not (self.prefetch and self.market is not None and self._reads_market(key[0], key[1])):
            return [group[i:i + size] for i in range(0, len(group), size)]
        per_window = 75 * (self._bars_for(key[0], key[1]) + 8) + 200  # base64 of 7 float64 columns
        cap = max(1, min(MAX_WINDOWS_PER_CALL, PREFETCH_BYTES // per_window))
        chunks: list[list[Evaluation]] = [[]]
        seen: set[tuple[str, str]] = set()
        for ev in group:
            wkey = (ev.node.instrument_key, ev.node.timeframe)
            if len(chunks[-1]) >= size or (wkey not in seen and len(seen) >= cap):
                chunks.append([])
                seen = set()
            seen.add(wkey)
            chunks[-1].append(ev)
        return chunks

    # ------------------------------------------------------------------ invoking

    def deadline_s(self, script_id: str, version: int, items: int | None = None) -> float:
        """How long an invocation of `items` items (None: as many as allowed) may take: no longer than
        its items could (their timeout: the version's own limit, else its tier's) plus a cold start,
        and than the configured deadline; never less than one item's timeout plus a cold start."""
        key = (script_id, version)
        if key not in self._item_timeouts:
            meta = self.invoker.version(script_id, version)[0]
            timeout_ms = meta.limits.timeout_ms if meta.limits and meta.limits.timeout_ms else None
            tier = self.cfg.tier(meta.tier or "pro")
            self._item_timeouts[key] = (timeout_ms or (tier.timeout_ms if tier else 0)) / 1000
        item = self._item_timeouts[key]
        longest = self.cfg.scheduler_invoke_timeout_s if items is None else \
            min(self.cfg.scheduler_invoke_timeout_s, items * item + DEADLINE_MARGIN_S)
        return max(item + DEADLINE_MARGIN_S, longest)

    def _invoke(self, key: tuple, chunk: list[Evaluation], call_id: str, data: BatchData | None = None) -> Answer:
        """One invocation of the chunk's function (`key`: its group). Touches no evaluation: the
        batch applies the answer. Raises InvocationFailed when the invocation itself failed."""
        script_id, version, tenant = key[:3]
        started = time.perf_counter()
        deadline = self.deadline_s(script_id, version, len(chunk))
        try:
            tokens: dict[tuple, str] = {}
            items = []
            for ev in chunk:
                p = ev.principal
                tkey = (p.user_id, p.tier, ev.node.time)
                if tkey not in tokens:
                    tokens[tkey] = self.invoker.execution_token(script_id, version, Scope(p.user_id, tenant, p.tier),
                                                                ev.node.time, ev.closure, call_id, realtime=True)
                items.append({"instrument_key": ev.node.instrument_key, "timeframe": ev.node.timeframe,
                              "params": ev.params, "timestamp": ev.node.time, "execution_token": tokens[tkey]})
            # the most common token becomes the batch default: items repeat it only when they differ
            common = Counter(i["execution_token"] for i in items).most_common(1)[0][0]
            for item in items:
                if item["execution_token"] == common:
                    del item["execution_token"]
            first = chunk[0].principal
            body: dict[str, Any] = {"items": items, "execution_token": common}
            prefetch = self._prefetch(script_id, version, tenant, chunk, data) if self.prefetch and data else None
            if prefetch is not None:
                # bound to this function, tenant (the invocation token's) and exact items by a MAC
                body["prefetch"] = sign_prefetch(function_name(script_id, version), tenant, items, common, prefetch)
            self.invoker.function_for(script_id, version, tenant)  # deployed before the clock runs
            started = time.perf_counter()
            answer = self.invoker.invoke(script_id, version, body, Scope(first.user_id, tenant, first.tier),
                                         call_id, timeout=deadline)
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list) or len(results) != len(chunk):
                raise InvocationFailed(f"function {function_name(script_id, version)} answered "
                                       f"{len(results) if isinstance(results, list) else 'no'} results for "
                                       f"{len(chunk)} items")
            checked = [check_result(r) for r in results]
        except ApiError as exc:
            # function unreachable / budget full / non-200 / malformed answer or result
            took = time.perf_counter() - started
            raise InvocationFailed(exc.message, deadline=took >= deadline * 0.95) from None
        took = time.perf_counter() - started
        needed = answer.get("prefetch_bars")
        if isinstance(needed, int) and needed >= 0 and prefetch is not None and data is not None \
                and data.windows and self._reads_market(script_id, version):
            learnt = self._bars.get((script_id, version))  # the default until a function reports
            self._bars[(script_id, version)] = min(MAX_BARS, needed if learnt is None else max(learnt, needed))
        hits = answer.get("prefetched_reads")
        if isinstance(hits, int) and hits > 0:
            metrics.PREFETCHED_READS.inc(hits)
            if data is not None:
                with data.lock:
                    data.prefetched_reads += hits
        metrics.INVOKE_SECONDS.observe(took)
        metrics.BATCH_ITEMS.observe(len(chunk))
        return Answer(checked, took)


class _BatchRun:
    """One batch's evaluations driven to their final status (see the module docstring): dispatch what
    is ready, apply each answer as it arrives, retry or dead-letter what failed, publish, and go on
    with what that made ready. Evaluations are only touched here, on the batch's thread."""

    def __init__(self, evaluator: Evaluator, evals: dict[Node, Evaluation], deps: dict[Node, list[Node]],
                 data: BatchData, report: BatchReport, received: dict[tuple[str, str, float], float],
                 started: float) -> None:
        self.ev = evaluator
        self.cfg = evaluator.cfg
        self.breakers = evaluator.breakers
        self.evals, self.deps, self.data, self.report = evals, deps, data, report
        self.received, self.started = received, started
        self.frontier = Frontier(list(evals), deps)
        self.needed = {d for ds in deps.values() for d in ds}  # outputs another evaluation reads
        self.pending: list[Evaluation] = []  # ready, waiting to be invoked (maybe for a retry's backoff)
        self.inflight: dict[Future, tuple[tuple, list[Evaluation]]] = {}
        self.busy: Counter = Counter()  # invocations in flight per function, and per breaker key
        self.rest: list[OutputRow] = []  # outputs nothing in the batch reads, published in the background
        self.background: list[Future] = []

    def run(self) -> None:
        try:
            self._finish([], self.frontier.ready())
            while True:
                self._dispatch()
                if not self.inflight and not self.pending:
                    break
                now = time.monotonic()
                later = [ev.not_before - now for ev in self.pending if ev.not_before > now]
                if not self.inflight:
                    if later:
                        time.sleep(min(later))  # only retries waiting for their backoff
                    continue
                done, _ = wait(list(self.inflight), timeout=min(later) if later else None,
                               return_when=FIRST_COMPLETED)
                finals: list[Evaluation] = []
                for fut in done:
                    group, chunk = self.inflight.pop(fut)
                    finals += self._apply(group, chunk, fut)
                self._finish(finals)
            for node in self.frontier.unfinished():  # only a dependency cycle leaves any
                ev = self.evals[node]
                ev.status, ev.error = "error", {"type": "DependencyCycle", "message": "dependency cycle"}
        finally:
            # never ack (or nak) while an invocation or a publish is under way
            wait(list(self.inflight))
            if self.rest:
                self.background.append(self.ev._publishing.submit(self.ev._publish_later, self.rest))
            self._collect(self.background)

    def _collect(self, futures: list[Future]) -> None:
        results = []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as exc:
                results.append(exc)
        for result in results:
            if isinstance(result, BaseException):
                raise result
            rows, new, done, took = result
            self.report.published += new
            self.report.timings_s["publish_bg"] = self.report.timings_s.get("publish_bg", 0.0) + took
            self.ev._record(rows, done, self.report, self.received, self.started)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self) -> None:
        """Invoke every ready evaluation its breaker and its function's free slots let through: open ->
        dead-lettered now; not proven -> one single-item probe at a time; proven -> chunks of the
        breaker's size, at most scheduler_function_inflight invocations of a function at once."""
        while self.pending:
            now = time.monotonic()
            groups: dict[tuple, list[Evaluation]] = defaultdict(list)
            keep = []
            for ev in self.pending:
                (groups[ev.group] if ev.not_before <= now else keep).append(ev)
            finals: list[Evaluation] = []
            for group, evs in groups.items():
                fkey, bkey = group[:2], group[:3]
                if self.breakers.is_open(bkey):
                    for ev in evs:
                        self._give_up(ev, "circuit_open", f"function {function_name(*fkey)} is failing for "
                                                          f"tenant {bkey[2]}; its circuit breaker is open")
                    finals += evs
                    continue
                slots = self.cfg.scheduler_function_inflight - self.busy[fkey]
                if slots <= 0 or (self.busy[bkey] and not self.breakers.proven(bkey)):
                    keep += evs
                    continue
                if self.breakers.proven(bkey):
                    chunks = self.ev._chunks(group, evs, self.breakers.chunk_cap(bkey, self.ev.deadline_s(*fkey)))
                else:  # a probe: one item decides whether the rest go in full chunks
                    chunks = [sorted(evs, key=lambda e: e.node.time)]
                    chunks = [chunks[0][:1], chunks[0][1:]]
                    slots = 1
                for chunk in chunks[slots:]:
                    keep += chunk
                for chunk in chunks[:slots]:
                    fut = self.ev.pool.submit(self.ev._invoke, group, chunk, self.report.call_id, self.data)
                    self.inflight[fut] = (group, chunk)
                    self.busy[fkey] += 1
                    self.busy[bkey] += 1
            self.pending = keep
            if not finals:
                return
            self._finish(finals)  # may make more evaluations ready: dispatch again

    # ------------------------------------------------------------------ answers

    def _apply(self, group: tuple, chunk: list[Evaluation], fut: Future) -> list[Evaluation]:
        """An invocation's outcome: final evaluations returned, failed ones queued for a retry."""
        bkey = group[:3]
        self.busy[group[:2]] -= 1
        self.busy[bkey] -= 1
        try:
            answer: Answer = fut.result()
        except InvocationFailed as exc:
            self.breakers.strike(bkey, hard=exc.deadline)
            logs.event(log, "realtime invocation failed", script_id=bkey[0], version=bkey[1], tenant=bkey[2],
                       items=len(chunk), error=str(exc)[:300])
            return [ev for ev in chunk if self._retry(ev, "invocation_failed", str(exc))]
        finals = []
        timeouts = 0
        for ev, res in zip(chunk, answer.results, strict=True):
            ev.metrics = {k: res.get(k) for k in ("duration_ms", "cpu_ms", "memory_mb")}
            if res["status"] != "ok" and res.get("retryable") is True:
                # set by the supervisor only, by the type of what it saw: a data gateway outage, or a
                # dependency's bars not yet published (another replica may be publishing them now)
                error = res.get("error") or {}
                if res["status"] == "dependency_failed":
                    ev.error = {k: v for k, v in error.items() if k != "traceback"}
                    reason = "dependency_unpublished"
                else:
                    reason = "data_source_unavailable"
                if self._retry(ev, reason, str(error.get("message", ""))):
                    finals.append(ev)
                continue
            ev.status, ev.error = res["status"], res.get("error")
            if ev.status == "ok":
                out = res["output"]
                ev.output_hash = canonical_hash(out)
                n = ev.node
                ev.row = OutputRow(time=n.time, tenant=n.tenant, instrument_key=n.instrument_key,
                                   timeframe=n.timeframe, script_id=n.script_id, version=n.version,
                                   params_hash=n.params_hash, value=out["value"], metadata=out.get("metadata") or {},
                                   call_id=self.report.call_id)
            else:
                timeouts += ev.status == "timeout"
                if ev.status != "dependency_failed":
                    logs.event(log, "realtime evaluation failed", script_id=bkey[0], version=bkey[1],
                               instrument_key=ev.node.instrument_key, time=ev.node.time, status=ev.status,
                               error=(ev.error or {}).get("message", "")[:300])
            finals.append(ev)
        for _ in range(timeouts):
            self.breakers.strike(bkey)
        if not timeouts:  # it answered every item in time (an outage it reported counts as an answer)
            self.breakers.success(bkey, answer.seconds / len(chunk))
        return finals

    def _retry(self, ev: Evaluation, reason: str, message: str) -> bool:
        """Queue a failed evaluation for another attempt after its backoff; True when its attempts
        are spent and it was dead-lettered instead."""
        ev.attempts += 1
        if ev.attempts >= self.cfg.scheduler_retry_attempts:
            if reason == "dependency_unpublished":  # final: what it read is still missing, nothing is lost
                ev.status = "dependency_failed"
                ev.error = {**(ev.error or {}), "attempts": ev.attempts,
                            "message": f"{message[:1000]} (still missing after {ev.attempts} attempt(s))"}
                return True
            self._give_up(ev, reason, message)
            return True
        backoff = self.cfg.scheduler_retry_backoff_s * 2 ** (ev.attempts - 1)
        ev.not_before = time.monotonic() + min(backoff, self.cfg.scheduler_retry_backoff_max_s)
        self.pending.append(ev)
        self.report.item_retries += 1
        metrics.ITEM_RETRIES.labels(reason).inc()
        return False

    def _give_up(self, ev: Evaluation, reason: str, message: str) -> None:
        ev.status = "error"
        ev.error = {"type": DEAD_LETTER_TYPES[reason], "dead_letter": reason, "attempts": ev.attempts,
                    "message": f"{message[:1000]} (dead-lettered after {ev.attempts} attempt(s))"}
        self.report.dead_letters.append(ev)

    # ------------------------------------------------------------------ publishing and what it unblocks

    def _finish(self, finals: list[Evaluation], ready: list[Node] | None = None) -> None:
        """Publish the outputs of evaluations that reached their final status (what another evaluation
        reads first, so it reads this event's value), then release their dependents: invoked when all
        their dependencies are ok, `dependency_failed` otherwise."""
        rows = [ev.row for ev in finals if ev.status == "ok" and ev.row is not None]
        first = [row for row in rows if _node_of(row) in self.needed]
        if first:
            t0 = time.perf_counter()
            self.ev._publish(first, self.data, self.report, self.received, self.started)
            self.report.timings_s["publish"] = self.report.timings_s.get("publish", 0.0) + time.perf_counter() - t0
        self.rest += [row for row in rows if _node_of(row) not in self.needed]
        if self.rest and all(f.done() for f in self.background):  # one background publish at a time
            self.background.append(self.ev._publishing.submit(self.ev._publish_later, self.rest))
            self.rest = []
        queue = list(ready or [])
        for ev in finals:
            queue += self.frontier.done(ev.node)
        while queue:
            node = queue.pop()
            ev = self.evals[node]
            failed = [d for d in self.deps.get(node, ()) if self.evals[d].status != "ok"]
            if not failed:
                self.pending.append(ev)
                continue
            ev.status = "dependency_failed"
            ev.error = {"type": "DependencyFailed", "dependency": failed[0].script_id,
                        "message": f"dependency {failed[0].script_id}@{failed[0].version} has no "
                                   f"output for this event ({self.evals[failed[0]].status})"}
            queue += self.frontier.done(node)


# ---------------------------------------------------------------------- the NATS loop


@dataclass
class RunStats:
    batches: int = 0
    events: int = 0
    evaluations: int = 0
    statuses: Counter = field(default_factory=Counter)
    retries: int = 0  # batches left unacknowledged (publishing failed)
    item_retries: int = 0  # evaluations tried again within their batch
    dead_letters: Counter = field(default_factory=Counter)  # by reason
    latencies_s: list[float] = field(default_factory=list)
    queued_s: list[float] = field(default_factory=list)
    prefetched_reads: int = 0


class Scheduler:
    """Consumes the market stream with a durable pull consumer; acks a batch only once it is published."""

    def __init__(self, evaluator: Evaluator, cfg: Settings | None = None) -> None:
        self.cfg = cfg or settings()
        self.evaluator = evaluator
        self.stats = RunStats()
        self.stopping = threading.Event()  # set by SIGTERM (`stop`): fetch nothing more, then exit
        self._stop_at: float | None = None
        self.handed_back = 0  # events of a batch naked at shutdown because it outlasted the grace

    def stop(self) -> None:
        """Graceful stop (SIGTERM): the batch under way gets `scheduler_stop_grace_s` to finish, then
        its events are handed back; nothing new is fetched. Safe from a signal handler."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self.stopping.set()

    def _grace_left(self) -> float | None:
        """Seconds the batch under way may still take (None: not stopping)."""
        if not self.stopping.is_set():
            return None
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        return self._stop_at + self.cfg.scheduler_stop_grace_s - time.monotonic()

    async def _connect(self):
        import nats

        from customscripts.marketdata.replayer import ensure_stream

        nc = await nats.connect(self.cfg.nats_url, connect_timeout=2, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.5, allow_reconnect=True)
        js = nc.jetstream()
        await ensure_stream(js, self.cfg)
        return nc, js

    async def _subscribe(self, js):
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(durable_name=self.cfg.scheduler_durable, ack_policy=AckPolicy.EXPLICIT,
                                deliver_policy=DeliverPolicy.ALL, ack_wait=self.cfg.scheduler_ack_wait_s,
                                max_deliver=self.cfg.scheduler_max_deliver, max_ack_pending=20_000)
        return await js.pull_subscribe(f"{self.cfg.nats_subject_prefix}.>", durable=self.cfg.scheduler_durable,
                                       stream=self.cfg.nats_stream, config=config)

    async def run(self, *, max_events: int | None = None, idle_exit_s: float | None = None,
                  until: Callable[[RunStats], bool] | None = None) -> RunStats:
        """Serve until stopped, `max_events` processed, `until(stats)` true, or idle for `idle_exit_s`."""
        nc = js = psub = None
        idle_since = time.monotonic()
        timer_task = None
        loop = asyncio.get_running_loop()
        try:
            while not self.stopping.is_set():
                if psub is None:
                    try:
                        nc, js = await self._connect()
                        psub = await self._subscribe(js)
                        if self.cfg.scheduler_timers and timer_task is None:
                            timer_task = asyncio.create_task(self._timers(js))
                    except Exception as exc:  # NATS down: keep trying, bounded by the caller's stop rules
                        logs.event(log, "scheduler cannot reach NATS yet", error=repr(exc)[:200])
                        if nc is not None:
                            with contextlib.suppress(Exception):
                                await nc.close()
                        nc = js = psub = None
                        if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                            break
                        await asyncio.sleep(0.5)
                        continue
                try:
                    msgs = await psub.fetch(self.cfg.scheduler_fetch_batch, timeout=1.0)
                except TimeoutError:
                    msgs = []
                except Exception as exc:  # connection trouble: nats-py reconnects; back off a little
                    logs.event(log, "fetch failed", error=repr(exc)[:200])
                    await asyncio.sleep(0.2)
                    msgs = []
                if not msgs:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                await self._handle(loop, msgs)
                idle_since = time.monotonic()
                if max_events is not None and self.stats.events >= max_events:
                    break
                if until is not None and until(self.stats):
                    break
        finally:
            if timer_task is not None:
                timer_task.cancel()
            if nc is not None:
                await self._disconnect(nc, psub)
        return self.stats

    @staticmethod
    async def _disconnect(nc, psub) -> None:
        """Bounded goodbye: acks and naks already sent are flushed, then the connection closes. (A
        `drain` waits out the pull subscription's outstanding fetch, ~30 s.)"""
        with contextlib.suppress(Exception):
            if psub is not None:
                await asyncio.wait_for(psub.unsubscribe(), timeout=2.0)
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout=3.0)

    async def _handle(self, loop: asyncio.AbstractEventLoop, msgs: list) -> None:
        events: list[Event] = []
        good = []
        for msg in msgs:
            try:
                received = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
                events.extend(parse_event(msg.subject, msg.data, received))
                good.append(msg)
            except Exception as exc:  # a malformed event can never succeed: drop it, loudly
                logs.event(log, "dropping malformed event", subject=msg.subject, error=repr(exc)[:200])
                with contextlib.suppress(Exception):
                    await msg.term()
        if not good:
            return
        work = _in_daemon_thread(loop, self.evaluator.process, events)
        try:
            # a long batch (slow scripts) keeps its messages: tell JetStream we are still on them
            beat = max(self.cfg.scheduler_ack_wait_s / 3, 0.5)
            last_beat = time.monotonic()
            while True:
                grace = self._grace_left()
                done, _ = await asyncio.wait({work}, timeout=beat if grace is None else max(0.0, min(beat, grace, 0.2)))
                if done:
                    break
                grace = self._grace_left()
                if grace is not None and grace <= 0:
                    await self._hand_back(good)
                    return
                if time.monotonic() - last_beat >= beat:
                    last_beat = time.monotonic()
                    for m in good:
                        with contextlib.suppress(Exception):
                            await m.in_progress()
            report = work.result()
        except Exception as exc:
            self.stats.retries += 1
            metrics.RETRIES.inc()
            deliveries = max(m.metadata.num_delivered for m in good)
            logs.event(log, "batch failed on the platform side; events will be redelivered", events=len(events),
                       deliveries=deliveries, error=repr(exc)[:300])
            if deliveries >= GIVE_UP_AFTER_DELIVERIES:
                logs.event(log, "giving up on events after repeated platform failures", events=len(events))
                for m in good:
                    with contextlib.suppress(Exception):
                        await m.term()
                return
            for m in good:
                with contextlib.suppress(Exception):
                    await m.nak(delay=1.0)
            await asyncio.sleep(0.5)
            return
        for m in good:  # only now: everything due for these events is published
            with contextlib.suppress(Exception):
                await m.ack()
        s = self.stats
        s.batches += 1
        s.events += len(good)
        s.evaluations += report.evaluations
        s.statuses.update(report.statuses)
        s.item_retries += report.item_retries
        s.dead_letters.update(ev.error["dead_letter"] for ev in report.dead_letters if ev.error)
        s.latencies_s.extend(report.latencies_s)
        s.queued_s.extend(report.queued_s)
        s.prefetched_reads += report.prefetched_reads
        logs.event(log, "batch published", events=len(good), evaluations=report.evaluations,
                   published=report.published, statuses=dict(report.statuses), item_retries=report.item_retries,
                   dead_letters=len(report.dead_letters),
                   prefetched_reads=report.prefetched_reads,
                   timings_ms={k: round(v * 1000, 1) for k, v in report.timings_s.items()})

    async def _hand_back(self, msgs: list) -> None:
        """Stopping and the batch under way outlasted the grace: its events go back to JetStream now
        (nak without delay: another replica takes them at once). Whatever the batch still publishes
        is idempotent, so the redelivery publishes each output once."""
        self.handed_back += len(msgs)
        for m in msgs:
            with contextlib.suppress(Exception):
                await m.nak()
        logs.event(log, "stopping: batch handed back unfinished", events=len(msgs))

    async def _timers(self, js) -> None:
        """Publish a tick per configured timeframe boundary (deduplicated by JetStream across replicas)."""
        frames = [ids.timeframe(tf.strip()) for tf in self.cfg.scheduler_timers.split(",") if tf.strip()]
        last: dict[str, float] = {}
        while True:
            now = time.time()
            for tf in frames:
                boundary = last_close(now, tf)  # the end of the bar that closed last (bartime.py)
                if last.get(tf) != boundary:
                    last[tf] = boundary
                    body = json.dumps({"timer": True, "timeframe": tf, "time": boundary}).encode()
                    with contextlib.suppress(Exception):
                        await js.publish(f"{self.cfg.nats_subject_prefix}.{TIMER_TOKEN}.{tf}", body,
                                         stream=self.cfg.nats_stream,
                                         headers={"Nats-Msg-Id": f"timer:{tf}:{boundary:.0f}"})
            await asyncio.sleep(1.0)


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """`fn(*args)` on a daemon thread, as an asyncio future: a batch handed back at shutdown must not
    hold the process (the loop's default executor is joined when asyncio.run ends)."""
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="cs-sched-batch", daemon=True).start()
    return future


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}


def timeframe_seconds(tf: str) -> int:
    ids.timeframe(tf)
    unit = "mo" if tf.endswith("mo") else tf[-1]
    return int(tf[: -len(unit)]) * _UNITS[unit]


def build_evaluator(cfg: Settings | None = None) -> Evaluator:
    """The production wiring: the one-time executor's Invoker, pooled Postgres, Redis publisher."""
    import redis

    from customscripts import db
    from customscripts.execution import default_executor
    from customscripts.outputs import OutputStore

    cfg = cfg or settings()
    invoker = default_executor().invoker
    # The scheduler invokes versions with live subscriptions, which the budget never evicts; a function
    # that vanished anyway (another replica, a provider restart) answers 404 and Invoker redeploys it.
    # So re-checking the deployment every 2 s (the budget's default: a Redis lock plus a function list
    # per version, serialising the invoking threads) buys nothing here.
    invoker.budget.cache_s = max(invoker.budget.cache_s, BUDGET_RECHECK_S)
    client = redis.Redis(host=cfg.redis_host, port=cfg.redis_port, socket_timeout=5, socket_connect_timeout=2)
    pool = db.pool()
    market = MarketWindows(db.pool(cfg.pg_reader_dsn, max_size=2))  # the gateway's read-only role
    return Evaluator(invoker, SubscriptionStore(pool), Publisher(client, OutputStore(pool)), cfg, market=market)


def run(cfg: Settings | None = None, **kwargs: Any) -> RunStats:
    """Blocking: build and run one scheduler replica (see Scheduler.run for the stop options)."""
    cfg = cfg or settings()
    evaluator = build_evaluator(cfg)
    if cfg.scheduler_metrics_port:
        metrics.serve(cfg.scheduler_metrics_port)
    try:
        return asyncio.run(Scheduler(evaluator, cfg).run(**kwargs))
    finally:
        evaluator.close()


def latency_summary(latencies: Iterable[float]) -> dict[str, float]:
    values = sorted(latencies)
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

    def pct(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)

    return {"p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(values[-1] * 1000, 1)}


def run_scheduler(argv: list[str] | None = None) -> int:
    """CLI hook (`customscripts scheduler ...`, `python -m scheduler.main`): run one replica."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="customscripts scheduler",
                                     description="Realtime scheduler: JetStream candle closes -> published outputs.")
    parser.add_argument("--max-events", type=int, default=None, help="stop after this many events")
    parser.add_argument("--idle-exit", type=float, default=None, help="stop after this many idle seconds")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    args = parser.parse_args(argv)
    cfg = settings()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    logs.setup()
    import signal

    evaluator = build_evaluator(cfg)
    scheduler = Scheduler(evaluator, cfg)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    try:
        stats = asyncio.run(scheduler.run(max_events=args.max_events, idle_exit_s=args.idle_exit))
    except KeyboardInterrupt:
        return 0
    finally:
        if not scheduler.handed_back:
            evaluator.close()
    logs.event(log, "scheduler stopped", events=stats.events, evaluations=stats.evaluations,
               statuses=dict(stats.statuses), retries=stats.retries, handed_back=scheduler.handed_back,
               **latency_summary(stats.latencies_s))
    if scheduler.handed_back:
        # its events are back in JetStream; the abandoned batch's invocation threads would hold the
        # interpreter's exit until their deadlines, so leave now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_scheduler(sys.argv[1:]))
