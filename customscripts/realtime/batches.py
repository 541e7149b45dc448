"""One invocation of a script function: its chunk of items, the data sent along, its answer.

Items of one invocation run in one sandboxed child, one after another, and share its module state
(see planner.py for who may share one). Items go in event-time order: nothing a script read for a
later event can be kept for an earlier one. An item carries its own execution token only when it
differs from the invocation's most common one. `prefetch` (customscripts/realtime/prefetch.py): the
chunk's candle windows and the outputs of the items' direct dependencies for these events,
MAC-signed, answered by the function's supervisor instead of gateway-fn when provably identical.

Invocation failures (function unreachable, non-200, malformed answer, wrong result count, past its
deadline) raise InvocationFailed: the trusted side saw them, so the batch retries their items.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from customscripts import logs
from customscripts.config import Settings
from customscripts.errors import DomainError
from customscripts.execution import Invoker, Scope, check_result
from customscripts.faas.naming import function_name
from customscripts.outputs import OutputRow
from customscripts.realtime import metrics
from customscripts.realtime.planner import Evaluation, Node, node_of
from customscripts.realtime.prefetch import MarketWindows, Window, encode, output_entry
from customscripts.realtime.versions import VersionFacts
from customscripts.sandbox.invocation import sign_prefetch

log = logs.get("customscripts.scheduler")

MAX_WINDOWS_PER_CALL = 256  # prefetched candle windows per invocation
PREFETCH_BYTES = 4 << 20  # and at most about this much of them: bodies stay well under the function's 8 MiB


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
                self.outputs[node_of(row)] = entry


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


class Invocations:
    """Packs chunks and invokes them (thread-safe: invocations of a batch run in parallel)."""

    def __init__(self, invoker: Invoker, versions: VersionFacts, cfg: Settings,
                 market: MarketWindows | None) -> None:
        self.invoker = invoker
        self.versions = versions
        self.cfg = cfg
        self.market = market  # None: no candle windows are prefetched (reads go to the gateway)
        self._slots: dict[tuple[str, int], threading.Semaphore] = {}
        self._slots_lock = threading.Lock()

    def _slot(self, script_id: str, version: int) -> threading.Semaphore:
        """The function's invocations in flight from this replica, across its batches
        (scheduler_function_inflight): a second one waits here, not at the function's supervisor,
        where the wait would count against its deadline."""
        with self._slots_lock:
            slot = self._slots.get((script_id, version))
            if slot is None:
                slot = self._slots[(script_id, version)] = threading.Semaphore(
                    max(1, self.cfg.scheduler_function_inflight))
            return slot

    # ------------------------------------------------------------------ data sent along

    def windows(self, evals: Iterable[Evaluation], data: BatchData) -> None:
        """The candle windows of every instrument a market-reading evaluation of the batch is on, as
        long as the longest read of those versions plus the batch's events, in one query; on a
        database error none (the scripts then read through the gateway)."""
        if self.market is None:
            return
        times: dict[tuple[str, str], set[float]] = defaultdict(set)
        bars: dict[tuple[str, str], int] = defaultdict(int)
        for ev in evals:
            n = ev.node
            if self.versions.reads_market(n.script_id, n.version):
                key = (n.instrument_key, n.timeframe)
                times[key].add(n.time)
                bars[key] = max(bars[key], self.versions.bars(n.script_id, n.version))
        if not times:
            return
        data.events = {k: len(v) for k, v in times.items()}
        try:
            data.windows = self.market.fetch({k: (max(v), bars[k] + len(v)) for k, v in times.items()})
        except Exception as exc:  # the read path still works without it
            logs.event(log, "prefetching candle windows failed; scripts read through the gateway",
                       error=repr(exc)[:200])

    def prefetch(self, script_id: str, version: int, tenant: str, chunk: list[Evaluation],
                 data: BatchData) -> str | None:
        """The prefetch `data` for one invocation: the chunk's candle windows (if the script reads
        market data) and the outputs of its direct dependencies for these events - only what each
        item's token may read, and only where the gateway's answer is unambiguous."""
        windows: dict[tuple[str, str], Window] = {}
        if data.windows and self.versions.reads_market(script_id, version):
            bars = self.versions.bars(script_id, version)
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

    def chunks(self, key: tuple, group: list[Evaluation], cap: int | None = None,
               prefetching: bool = True) -> list[list[Evaluation]]:
        """At most `cap` (default scheduler_max_items) items per invocation and, for market readers, at most
        MAX_WINDOWS_PER_CALL instruments and PREFETCH_BYTES of candle windows. Items go in event-time
        order: one child runs them one after another with shared module state, so an item must never
        run after one with a later as-of (whatever it read could otherwise be kept for an earlier event:
        lookahead)."""
        size = cap or self.cfg.scheduler_max_items
        group = sorted(group, key=lambda ev: ev.node.time)  # stable: otherwise in event order
        if not (prefetching and self.market is not None and self.versions.reads_market(key[0], key[1])):
            return [group[i:i + size] for i in range(0, len(group), size)]
        per_window = 75 * (self.versions.bars(key[0], key[1]) + 8) + 200  # base64 of 7 float64 columns
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

    def invoke(self, key: tuple, chunk: list[Evaluation], call_id: str, data: BatchData | None = None) -> Answer:
        """One invocation of the chunk's function (`key`: its group; `data`: what may be sent along,
        None: nothing). Touches no evaluation: the batch applies the answer. Raises InvocationFailed
        when the invocation itself failed."""
        script_id, version, tenant = key[:3]
        started = time.perf_counter()
        deadline = self.versions.deadline_s(script_id, version, len(chunk))
        prefetch = None
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
            prefetch = self.prefetch(script_id, version, tenant, chunk, data) if data is not None else None
            if prefetch is not None:
                # bound to this function, tenant (the invocation token's) and exact items by a MAC
                body["prefetch"] = sign_prefetch(function_name(script_id, version), tenant, items, common, prefetch)
            with self._slot(script_id, version):
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
        except DomainError as exc:
            # function unreachable / budget full / non-200 / malformed answer or result
            took = time.perf_counter() - started
            raise InvocationFailed(exc.message, deadline=took >= deadline * 0.95) from None
        took = time.perf_counter() - started
        needed = answer.get("prefetch_bars")
        if isinstance(needed, int) and needed >= 0 and prefetch is not None and data is not None \
                and data.windows and self.versions.reads_market(script_id, version):
            self.versions.learn_bars(script_id, version, needed)
        hits = answer.get("prefetched_reads")
        if isinstance(hits, int) and hits > 0:
            metrics.PREFETCHED_READS.inc(hits)
            if data is not None:
                with data.lock:
                    data.prefetched_reads += hits
        metrics.INVOKE_SECONDS.observe(took)
        metrics.BATCH_ITEMS.observe(len(chunk))
        return Answer(checked, took)
