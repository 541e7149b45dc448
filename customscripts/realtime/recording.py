"""What a batch leaves behind: its report, its published outputs, its dead letters and audit rows.

Outputs another evaluation of the batch reads are published at once (so a dependent reading "as of
the event" reads this event's value, and from the prefetch when every row was new); the others in the
background, one publish at a time. Dead letters are recorded, and every evaluation (denied ones
included) gets its audit row, before the events are acknowledged. Publishing commits synchronously
(publisher.py): acknowledged means on disk.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from customscripts import logs
from customscripts.auth import Principal
from customscripts.execution import error_detail
from customscripts.outputs import OutputRow
from customscripts.realtime import metrics
from customscripts.realtime.batches import BatchData
from customscripts.realtime.planner import Evaluation, Node, Planner
from customscripts.realtime.publisher import DeadLetter, Publisher
from customscripts.realtime.subscriptions import Subscription
from customscripts.registry.audit import AuditRow

log = logs.get("customscripts.scheduler")

Received = dict[tuple[str, str, float], float]  # (instrument, timeframe, event time) -> entered JetStream


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

    def timed(self, name: str, seconds: float) -> None:
        self.timings_s[name] = self.timings_s.get(name, 0.0) + seconds


class BatchRecorder:
    """Publishes and records batches through one publisher (one background publish at a time)."""

    def __init__(self, publisher: Publisher, planner: Planner, audit_log, audit_action: str | None) -> None:
        self.publisher = publisher
        self.planner = planner
        self.audit_log = audit_log  # the registry's AuditWriter (its `submit_many`); None: no audit rows
        self.audit_action = audit_action  # None: no row per evaluation (the caller writes its own)
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cs-sched-publish")

    def close(self) -> None:
        self._background.shutdown(wait=True)  # a publish under way finishes: its events are not acked

    def publish_now(self, rows: list[OutputRow], data: BatchData | None, report: BatchReport, received: Received,
                    started: float) -> None:
        """Publish outputs dependents of this batch read; they become prefetchable (`data`) if all
        were new: exactly what the gateway now reads."""
        t0 = time.perf_counter()
        new, inserted = self.publisher.publish_rows(rows)
        report.published += new
        if data is not None and inserted == len(rows):
            data.add_outputs(rows)
        record_latencies(rows, time.time(), report, received, started)
        report.timed("publish", time.perf_counter() - t0)

    def publish_later(self, rows: list[OutputRow]) -> Future:
        return self._background.submit(self._publish, rows)

    def _publish(self, rows: list[OutputRow]) -> tuple[list[OutputRow], int, float, float]:
        t0 = time.perf_counter()
        new, _ = self.publisher.publish_rows(rows)
        return rows, new, time.time(), time.perf_counter() - t0

    def dead_letter(self, report: BatchReport) -> None:
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

    def audit(self, report: BatchReport) -> None:
        """One audit row per evaluation of a batch that was published (denied ones included), written
        off the batch's path by the registry's AuditWriter."""
        action = self.audit_action
        if action is None or self.audit_log is None:
            return
        rows = [AuditRow(report.call_id, ev.node.script_id, ev.node.version, ev.principal.user_id, ev.node.tenant,
                         action, ev.status, error_detail(ev.error), ev.node.params_hash, ev.output_hash,
                         ev.metrics.get("duration_ms"), ev.metrics.get("cpu_ms"), ev.metrics.get("memory_mb"))
                for ev in report.results.values()]
        rows += [AuditRow(report.call_id, sub.script_id, sub.version, principal.user_id, sub.tenant, action,
                          "denied", reason, self.planner.params_hash(sub)) for sub, principal, reason in report.denied]
        self.audit_log.submit_many(rows)  # one hand-over for the batch, not one per row


def record_latencies(rows: list[OutputRow], done: float, report: BatchReport, received: Received,
                     started: float) -> None:
    for row in rows:
        t0 = received.get((row.instrument_key, row.timeframe, float(row.time)))
        if t0:
            report.latencies_s.append(done - t0)
            report.queued_s.append(max(0.0, started - t0))
