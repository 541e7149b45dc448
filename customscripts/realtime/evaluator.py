"""The evaluator: a batch of events in, published outputs and a report out (synchronous).

The realtime scheduler's consumer (consumer.py), series and backfill runs (customscripts/series.py)
all evaluate through it. A batch is planned (planner.py), its candle windows fetched in one query
(batches.py, prefetch.py), its evaluations run in dependency order and published as they finish
(batchrun.py, recording.py); only after every output and dead letter is recorded — committed
synchronously, on disk — does `process` return, and only then are the events acknowledged.
Latency: event -> published = queued (JetStream, the fetch, the batch before this one: `queued_s`)
+ work (plan, prefetch, invocations and their publishing); the report keeps both.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from customscripts.config import Settings, settings
from customscripts.execution import Invoker
from customscripts.realtime import metrics
from customscripts.realtime.batches import BatchData, Invocations
from customscripts.realtime.batchrun import BatchRun
from customscripts.realtime.breakers import Breakers
from customscripts.realtime.events import Event
from customscripts.realtime.planner import Planner
from customscripts.realtime.prefetch import MarketWindows
from customscripts.realtime.publisher import Publisher
from customscripts.realtime.recording import BatchRecorder, BatchReport
from customscripts.realtime.subscriptions import Subscription, SubscriptionStore
from customscripts.realtime.versions import VersionFacts


class Evaluator:
    def __init__(self, invoker: Invoker, subscriptions: SubscriptionStore | None, publisher: Publisher,
                 cfg: Settings | None = None, workers: int | None = None, *,
                 market: MarketWindows | None = None, prefetch: bool = True,
                 audit_action: str | None = "realtime") -> None:
        self.cfg = cfg or settings()
        self.prefetch = prefetch  # False: send nothing along, every read goes to the gateway
        self.invoker = invoker
        self.registry = invoker.registry
        self.versions = VersionFacts(invoker, self.cfg)
        self.planner = Planner(self.registry, self.versions, subscriptions)
        self.invocations = Invocations(invoker, self.versions, self.cfg, market)
        # each evaluation's audit row names `audit_action` (series and backfill runs reuse the evaluator
        # with their own); None: no row per evaluation (the caller writes its own)
        audit_log = self.registry.catalog.audit_log if self.registry is not None else None
        self.recorder = BatchRecorder(publisher, self.planner, audit_log, audit_action)
        self.breakers = Breakers(self.cfg)
        self.pool = ThreadPoolExecutor(max_workers=workers or self.cfg.scheduler_workers,
                                       thread_name_prefix="cs-sched-invoke")

    @property
    def publisher(self) -> Publisher:
        return self.recorder.publisher

    @publisher.setter
    def publisher(self, publisher: Publisher) -> None:
        self.recorder.publisher = publisher

    @property
    def market(self) -> MarketWindows | None:
        """Where candle windows are prefetched from (None: reads go to the gateway)."""
        return self.invocations.market

    @market.setter
    def market(self, market: MarketWindows | None) -> None:
        self.invocations.market = market

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.recorder.close()

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
        evals, deps = self.planner.plan(events, report.denied, due)
        if report.denied:
            report.statuses["denied"] += len(report.denied)
        report.timings_s["plan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = BatchData(deps=deps)
        if self.prefetch:
            self.invocations.windows(evals.values(), data)
        report.timings_s["prefetch"] = time.perf_counter() - t0
        report.call_id = call_id or uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        BatchRun(self, evals, deps, data, report, received, started).run()
        report.timings_s["run"] = time.perf_counter() - t0
        self.recorder.dead_letter(report)
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
        self.recorder.audit(report)
        return report
