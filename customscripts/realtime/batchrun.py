"""One batch's evaluations driven to their final status.

Evaluations run in dependency order (`waves.Frontier`): an evaluation is invoked as soon as its own
dependencies are published, batched with the ready evaluations of its group into one invocation
(batches.py). Invocations run in parallel; each answer is applied as it arrives, the outputs a later
evaluation reads are published before it is invoked, the others in the background (recording.py). A
dependent of a dependency that did not produce an ok output for this event is `dependency_failed`
and never invoked (it would otherwise read the previous event's value).

Failures stay inside their function and tenant. Whether a failure is transient is decided on the
trusted side only: the supervisor's `retryable` flag (by the type of what it saw itself: a data
gateway outage, or a dependency read missing bars not yet published — another replica may be
publishing T-1 right now; still missing after the attempts, it is final `dependency_failed`, not a
dead letter) or the invocation itself failing (InvocationFailed). What a script raises or prints never
counts: it is that evaluation's `error`. Only the failed items are tried again, up to
`scheduler_retry_attempts` with exponential backoff, then dead-lettered: status `error` naming the
dead letter, a row in `realtime_dead_letters`, the audit row, `cs_realtime_dead_letters_total`; their
dependents are `dependency_failed`. Breakers (breakers.py) bound a function that keeps failing.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING

from customscripts import logs
from customscripts.execution import canonical_hash
from customscripts.faas.naming import function_name
from customscripts.outputs import OutputRow
from customscripts.realtime import metrics
from customscripts.realtime.batches import Answer, BatchData, InvocationFailed
from customscripts.realtime.planner import Evaluation, Node
from customscripts.realtime.recording import BatchReport, Received, record_latencies
from customscripts.realtime.waves import Frontier

if TYPE_CHECKING:
    from customscripts.realtime.evaluator import Evaluator

log = logs.get("customscripts.scheduler")

# why an evaluation was dead-lettered -> its error type
DEAD_LETTER_TYPES = {"invocation_failed": "InvocationFailed", "data_source_unavailable": "DataSourceUnavailable",
                     "circuit_open": "CircuitOpen"}


class BatchRun:
    """One batch's evaluations driven to their final status (see the module docstring): dispatch what
    is ready, apply each answer as it arrives, retry or dead-letter what failed, publish, and go on
    with what that made ready. Evaluations are only touched here, on the batch's thread."""

    def __init__(self, evaluator: Evaluator, evals: dict[Node, Evaluation], deps: dict[Node, list[Node]],
                 data: BatchData, report: BatchReport, received: Received, started: float) -> None:
        self.ev = evaluator
        self.cfg = evaluator.cfg
        self.breakers = evaluator.breakers
        self.invocations = evaluator.invocations
        self.recorder = evaluator.recorder
        self.prefetching = evaluator.prefetch
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
                self.background.append(self.recorder.publish_later(self.rest))
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
            self.report.timed("publish_bg", took)
            record_latencies(rows, done, self.report, self.received, self.started)

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
                    cap = self.breakers.chunk_cap(bkey, self.invocations.versions.deadline_s(*fkey))
                    chunks = self.invocations.chunks(group, evs, cap, self.prefetching)
                else:  # a probe: one item decides whether the rest go in full chunks
                    chunks = [sorted(evs, key=lambda e: e.node.time)]
                    chunks = [chunks[0][:1], chunks[0][1:]]
                    slots = 1
                for chunk in chunks[slots:]:
                    keep += chunk
                for chunk in chunks[:slots]:
                    fut = self.ev.pool.submit(self.invocations.invoke, group, chunk, self.report.call_id,
                                              self.data if self.prefetching else None)
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
        """Queue a failed evaluation for another attempt after its backoff; True when its attempts are
        spent (for a data path outage: also CS_SCHEDULER_OUTAGE_RETRY_S since its first failure) and it
        was dead-lettered instead."""
        ev.attempts += 1
        now = time.monotonic()
        ev.failing_since = ev.failing_since or now
        outage = reason == "data_source_unavailable" and now - ev.failing_since < self.cfg.scheduler_outage_retry_s
        if ev.attempts >= self.cfg.scheduler_retry_attempts and not outage:
            if reason == "dependency_unpublished":  # final: what it read is still missing, nothing is lost
                ev.status = "dependency_failed"
                ev.error = {**(ev.error or {}), "attempts": ev.attempts,
                            "message": f"{message[:1000]} (still missing after {ev.attempts} attempt(s))"}
                return True
            self._give_up(ev, reason, message)
            return True
        backoff = self.cfg.scheduler_retry_backoff_s * 2 ** min(ev.attempts - 1, 30)
        ev.not_before = now + min(backoff, self.cfg.scheduler_retry_backoff_max_s)
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
        oks = [ev for ev in finals if ev.status == "ok" and ev.row is not None]
        first = [ev.row for ev in oks if ev.node in self.needed]
        if first:
            self.recorder.publish_now(first, self.data if self.prefetching else None, self.report, self.received,
                                      self.started)
        self.rest += [ev.row for ev in oks if ev.node not in self.needed]
        if self.rest and all(f.done() for f in self.background):  # one background publish at a time
            self.background.append(self.recorder.publish_later(self.rest))
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
