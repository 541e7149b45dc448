"""The realtime scheduler: candle-close events in, published indicator outputs out.

Flow for every batch fetched from the JetStream durable pull consumer (replicas share the durable
name, so they share the work):

1. parse the events (candle closes, timer ticks); find the due subscriptions in one query;
2. check each subscriber's permission on the version and its dependency closure *now* (with the
   claims snapshot taken at subscribe time): a lost entitlement makes the evaluation `denied`;
3. build evaluations — one per (tenant, script version, params, instrument, timeframe, event time),
   shared by every subscriber of the tenant that asks for it (outputs belong to the tenant, not to a
   user) — and add each one's dependencies for the same event with params `{}`;
4. fetch, in one query, the candle windows of every instrument a market-reading script of the batch
   is evaluated on (customscripts.realtime.prefetch);
5. order them in dependency waves; per wave, batch the evaluations of one function *and one tenant*
   into one invocation (`{"items": [...]}` in event-time order; an item carries its own execution
   token only when its principal or as-of time differs from the batch's; `prefetch`: the candle
   windows and the outputs of the items' direct dependencies for these events, MAC-signed, answered
   by the function's supervisor instead of gateway-fn when provably identical), invoke the functions
   of a wave in parallel, validate, and publish the outputs a later wave reads before it starts — so
   a dependent reading its dependency's output "as of the event" reads this event's value; the other
   outputs are published in the background while the next waves run;
6. a dependent of a dependency that did not produce an ok output for this event is
   `dependency_failed` and is never invoked (it would otherwise read the previous event's value);
7. only after every output is published are the NATS messages acknowledged. A failure of Redis,
   PostgreSQL or the data gateway (transient) leaves the batch unacknowledged (nak with delay) and it is
   redelivered; publishing is idempotent, so nothing is lost or duplicated.

Batches never mix tenants in one sandboxed child: items of one child share module state, and tenants
must not. Different users of one tenant may share a batch (their outputs are the tenant's anyway;
each item's reads are still authorised by its own token). For the same reason items run in event-time
order: nothing a script read for a later event can be kept for an earlier one.

Latency: event -> published = queued (JetStream, the fetch, the batch before this one: `queued_s`)
+ work (plan, prefetch, the waves and their publishing). The report and RunStats keep both.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from customscripts import ids, logs
from customscripts.auth import Principal
from customscripts.config import Settings, settings
from customscripts.errors import ApiError
from customscripts.execution import Invoker, Scope, canonical_hash, check_result, error_detail
from customscripts.faas.naming import function_name
from customscripts.outputs import OutputRow, params_hash
from customscripts.realtime import metrics
from customscripts.realtime.prefetch import DEFAULT_BARS, MAX_BARS, MarketWindows, Window, encode, output_entry
from customscripts.realtime.publisher import Publisher
from customscripts.realtime.subscriptions import Subscription, SubscriptionStore
from customscripts.realtime.waves import waves
from customscripts.registry.audit import AuditRow
from customscripts.sandbox.invocation import sign_prefetch

log = logs.get("customscripts.scheduler")

TIMER_TOKEN = "_timer"
BUDGET_RECHECK_S = 60.0
_NO_PARAMS = params_hash({})  # dependencies are evaluated with params {}
MAX_WINDOWS_PER_CALL = 256  # prefetched candle windows per invocation
PREFETCH_BYTES = 4 << 20  # and at most about this much of them: bodies stay well under the function's 8 MiB
GIVE_UP_AFTER_DELIVERIES = 50  # a transient failure that lasts this long is logged and dropped


@dataclass(frozen=True)
class Event:
    """A candle close (or timer tick) for one instrument and timeframe at `time` (epoch s)."""

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


@dataclass
class BatchReport:
    events: int = 0
    evaluations: int = 0
    statuses: Counter = field(default_factory=Counter)
    published: int = 0
    retry: bool = False  # a transient failure: leave the events unacknowledged
    latencies_s: list[float] = field(default_factory=list)  # event received -> published, per evaluation
    queued_s: list[float] = field(default_factory=list)  # event received -> batch started, per evaluation
    results: dict[Node, Evaluation] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)  # plan, wave<k>, publish<k>: where time goes
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


class TransientFailure(Exception):
    """Infrastructure failed under an evaluation (gateway, function unreachable): retry the batch."""


def parse_event(subject: str, data: bytes, received: float = 0.0) -> list[Event]:
    """A candle-close message → one event; a timer tick → one event per instrument resolved later."""
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("event is not a JSON object")
    t = float(body["time"])
    if not math.isfinite(t):
        raise ValueError("event time is not finite")
    if body.get("timer"):
        return [Event("", ids.timeframe(body["timeframe"]), t, received)]
    return [Event(ids.instrument_key(body["instrument_key"]), ids.timeframe(body["timeframe"]), t, received)]


class Evaluator:
    """Synchronous core of the scheduler: a batch of events in, published outputs and a report out."""

    def __init__(self, invoker: Invoker, subscriptions: SubscriptionStore, publisher: Publisher,
                 cfg: Settings | None = None, workers: int | None = None, *,
                 market: MarketWindows | None = None, prefetch: bool = True) -> None:
        self.cfg = cfg or settings()
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

    def plan(self, events: Sequence[Event], report: BatchReport
             ) -> tuple[dict[Node, Evaluation], dict[Node, list[Node]]]:
        """Due subscriptions → evaluations (deduplicated per tenant) and their dependency edges."""
        allowed: dict[tuple, list[tuple[str, int]] | ApiError] = {}
        evals: dict[Node, Evaluation] = {}
        deps: dict[Node, list[Node]] = {}
        for event, sub in self._due(events):
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
        return evals, deps

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

    def process(self, events: Sequence[Event]) -> BatchReport:
        """Evaluate and publish everything due for `events`. Raises on a transient failure (retry)."""
        report = BatchReport(events=len(events))
        started = time.time()  # before: queueing (JetStream, fetch, the previous batch); after: work
        events = list(dict.fromkeys(events))
        received = {(e.instrument_key, e.timeframe, e.time): e.received for e in events}
        t0 = time.perf_counter()
        evals, deps = self.plan(events, report)
        report.timings_s["plan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = BatchData(deps=deps)
        self._windows(evals.values(), data)
        report.timings_s["prefetch"] = time.perf_counter() - t0
        call_id = report.call_id = uuid.uuid4().hex[:16]
        # outputs another evaluation of this batch reads are published before the next wave starts;
        # the others in the background, overlapping the next waves (all before the events are acked)
        needed = {d for ds in deps.values() for d in ds}
        background: list[Future] = []
        try:
            for k, wave in enumerate(waves(list(evals), deps)):
                runnable = []
                for node in wave:
                    ev = evals[node]
                    failed = [d for d in deps.get(node, ()) if evals[d].status != "ok"]
                    if failed:
                        ev.status = "dependency_failed"
                        ev.error = {"type": "DependencyFailed", "dependency": failed[0].script_id,
                                    "message": f"dependency {failed[0].script_id}@{failed[0].version} has no "
                                               f"output for this event ({evals[failed[0]].status})"}
                    else:
                        runnable.append(ev)
                t0 = time.perf_counter()
                rows = self._run_wave(runnable, call_id, data)
                t1 = time.perf_counter()
                report.timings_s[f"wave{k}"] = t1 - t0
                first = [row for row in rows if _node_of(row) in needed]
                if first:
                    self._publish(first, data, report, received, started)
                    report.timings_s[f"publish{k}"] = time.perf_counter() - t1
                rest = [row for row in rows if _node_of(row) not in needed]
                if rest:
                    background.append(self._publishing.submit(self._publish_later, rest))
        finally:
            results = []
            for fut in background:  # never ack (or retry) while a publish is still under way
                try:
                    results.append(fut.result())
                except Exception as exc:
                    results.append(exc)
        for result in results:
            if isinstance(result, BaseException):
                raise result
            rows, new, done, took = result
            report.published += new
            report.timings_s["publish_bg"] = report.timings_s.get("publish_bg", 0.0) + took
            self._record(rows, done, report, received, started)
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

    def _audit(self, report: BatchReport) -> None:
        """One audit row per evaluation of a batch that was published (denied ones included), written
        off the batch's path by the registry's AuditWriter."""
        log_rows = self.registry.catalog.audit_log.submit
        for ev in report.results.values():
            n = ev.node
            log_rows(AuditRow(report.call_id, n.script_id, n.version, ev.principal.user_id, n.tenant, "realtime",
                              ev.status, error_detail(ev.error), n.params_hash, ev.output_hash,
                              ev.metrics.get("duration_ms"), ev.metrics.get("cpu_ms"), ev.metrics.get("memory_mb")))
        for sub, principal, reason in report.denied:
            log_rows(AuditRow(report.call_id, sub.script_id, sub.version, principal.user_id, sub.tenant, "realtime",
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

    def _chunks(self, key: tuple[str, int, str], group: list[Evaluation]) -> list[list[Evaluation]]:
        """At most scheduler_max_items per invocation and, for market readers, at most
        MAX_WINDOWS_PER_CALL instruments and PREFETCH_BYTES of candle windows. Items go in event-time
        order: one child runs them one after another with shared module state, so an item must never
        run after one with a later as-of (whatever it read could otherwise be kept for an earlier event:
        lookahead)."""
        size = self.cfg.scheduler_max_items
        group = sorted(group, key=lambda ev: ev.node.time)  # stable: otherwise in event order
        if not (self.prefetch and self.market is not None and self._reads_market(key[0], key[1])):
            return [group[i:i + size] for i in range(0, len(group), size)]
        per_window = 64 * (self._bars_for(key[0], key[1]) + 8) + 200  # base64 of 6 float64 columns
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

    def _run_wave(self, runnable: list[Evaluation], call_id: str, data: BatchData | None = None
                  ) -> list[OutputRow]:
        data = data or BatchData()
        groups: dict[tuple[str, int, str], list[Evaluation]] = defaultdict(list)
        for ev in runnable:
            groups[(ev.node.script_id, ev.node.version, ev.node.tenant)].append(ev)
        chunks = [(key, chunk) for key, group in groups.items() for chunk in self._chunks(key, group)]
        futures = [self.pool.submit(self._invoke, key, chunk, call_id, data) for key, chunk in chunks]
        rows: list[OutputRow] = []
        transient: list[BaseException] = []
        for fut in futures:
            try:
                rows.extend(fut.result())
            except TransientFailure as exc:
                transient.append(exc)
        if transient:
            raise transient[0]
        return rows

    def _invoke(self, key: tuple[str, int, str], chunk: list[Evaluation], call_id: str,
                data: BatchData | None = None) -> list[OutputRow]:
        script_id, version, tenant = key
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
        started = time.perf_counter()
        try:
            answer = self.invoker.invoke(script_id, version, body, Scope(first.user_id, tenant, first.tier),
                                         call_id)
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list) or len(results) != len(chunk):
                raise TransientFailure(f"{script_id}@{version} answered {len(results or [])} results "
                                       f"for {len(chunk)} items")
            checked = [check_result(r) for r in results]
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
        except ApiError as exc:
            # function unreachable / budget full / malformed answer: the events are retried later
            raise TransientFailure(f"{script_id}@{version}: {exc.message}") from None
        metrics.INVOKE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_ITEMS.observe(len(chunk))
        rows = []
        for ev, res in zip(chunk, checked, strict=True):
            ev.status, ev.error = res["status"], res.get("error")
            ev.metrics = {k: res.get(k) for k in ("duration_ms", "cpu_ms", "memory_mb")}
            if _transient(res):
                raise TransientFailure(f"{script_id}@{version}: {res['error'].get('message', '')[:200]}")
            if ev.status == "ok":
                out = res["output"]
                ev.output_hash = canonical_hash(out)
                rows.append(OutputRow(time=ev.node.time, tenant=tenant, instrument_key=ev.node.instrument_key,
                                      timeframe=ev.node.timeframe, script_id=script_id, version=version,
                                      params_hash=ev.node.params_hash, value=out["value"],
                                      metadata=out.get("metadata") or {}, call_id=call_id))
            elif ev.status != "dependency_failed":
                logs.event(log, "realtime evaluation failed", script_id=script_id, version=version,
                           instrument_key=ev.node.instrument_key, time=ev.node.time, status=ev.status,
                           error=(ev.error or {}).get("message", "")[:300])
        return rows


def _transient(result: dict[str, Any]) -> bool:
    """The data gateway was unreachable after its retries: infrastructure, not the script's fault."""
    error = result.get("error") or {}
    return (result.get("status") == "error" and error.get("type") == "DataAccessError"
            and "unavailable" in str(error.get("message", "")))


# ---------------------------------------------------------------------- the NATS loop


@dataclass
class RunStats:
    batches: int = 0
    events: int = 0
    evaluations: int = 0
    statuses: Counter = field(default_factory=Counter)
    retries: int = 0
    latencies_s: list[float] = field(default_factory=list)
    queued_s: list[float] = field(default_factory=list)
    prefetched_reads: int = 0


class Scheduler:
    """Consumes the market stream with a durable pull consumer; acks a batch only once it is published."""

    def __init__(self, evaluator: Evaluator, cfg: Settings | None = None) -> None:
        self.cfg = cfg or settings()
        self.evaluator = evaluator
        self.stats = RunStats()
        self.stopping = threading.Event()

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
                with contextlib.suppress(Exception):
                    await nc.drain()
        return self.stats

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
        work = loop.run_in_executor(None, self.evaluator.process, events)
        try:
            # a long batch (slow scripts) keeps its messages: tell JetStream we are still on them
            while True:
                done, _ = await asyncio.wait({work}, timeout=max(self.cfg.scheduler_ack_wait_s / 3, 0.5))
                if done:
                    break
                for m in good:
                    with contextlib.suppress(Exception):
                        await m.in_progress()
            report = work.result()
        except Exception as exc:
            self.stats.retries += 1
            metrics.RETRIES.inc()
            deliveries = max(m.metadata.num_delivered for m in good)
            logs.event(log, "batch not published; events will be redelivered", events=len(events),
                       deliveries=deliveries, error=repr(exc)[:300])
            if deliveries >= GIVE_UP_AFTER_DELIVERIES:
                logs.event(log, "giving up on events after repeated transient failures", events=len(events))
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
        s.latencies_s.extend(report.latencies_s)
        s.queued_s.extend(report.queued_s)
        s.prefetched_reads += report.prefetched_reads
        logs.event(log, "batch published", events=len(good), evaluations=report.evaluations,
                   published=report.published, statuses=dict(report.statuses),
                   prefetched_reads=report.prefetched_reads,
                   timings_ms={k: round(v * 1000, 1) for k, v in report.timings_s.items()})

    async def _timers(self, js) -> None:
        """Publish a tick per configured timeframe boundary (deduplicated by JetStream across replicas)."""
        frames = [ids.timeframe(tf.strip()) for tf in self.cfg.scheduler_timers.split(",") if tf.strip()]
        last: dict[str, float] = {}
        while True:
            now = time.time()
            for tf in frames:
                step = timeframe_seconds(tf)
                boundary = math.floor(now / step) * step
                if last.get(tf) != boundary:
                    last[tf] = boundary
                    body = json.dumps({"timer": True, "timeframe": tf, "time": boundary}).encode()
                    with contextlib.suppress(Exception):
                        await js.publish(f"{self.cfg.nats_subject_prefix}.{TIMER_TOKEN}.{tf}", body,
                                         stream=self.cfg.nats_stream,
                                         headers={"Nats-Msg-Id": f"timer:{tf}:{boundary:.0f}"})
            await asyncio.sleep(1.0)


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
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stopping.set())
    try:
        stats = asyncio.run(scheduler.run(max_events=args.max_events, idle_exit_s=args.idle_exit))
    except KeyboardInterrupt:
        return 0
    finally:
        evaluator.close()
    logs.event(log, "scheduler stopped", events=stats.events, evaluations=stats.evaluations,
               statuses=dict(stats.statuses), retries=stats.retries, **latency_summary(stats.latencies_s))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_scheduler(sys.argv[1:]))
