"""Planning a batch: due subscriptions → evaluations, their dependencies, audiences and groups.

1. the due subscriptions of the events (candle closes: one query; timer ticks: every subscription on
   the timeframe), or exactly the `due` pairs a series or a backfill gives;
2. each subscriber's permission on the version and its dependency closure is checked *now*
   (`RegistryService.check_execution`, with the claims snapshot taken at subscribe time): a lost
   entitlement makes the evaluation `denied`;
3. one evaluation per (tenant, script version, params, instrument, timeframe, event time), shared by
   every subscriber of the tenant that asks for it (outputs belong to the tenant, not to a user; it
   runs once, for one of them), and each one's dependencies for the same event with params `{}`,
   their closures as `RegistryService.resolve_closure` gives them;
4. each evaluation's *audience* (the users whose subscriptions read its output, through dependents
   too) and *group*: function, tenant, principal and audience. Only evaluations of one group share a
   sandboxed child (module state): one user's params never reach an output another user reads, and
   an output several users read is never computed next to one user's private evaluations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from customscripts import logs
from customscripts.auth import Principal
from customscripts.errors import DomainError
from customscripts.outputs import OutputRow, params_hash
from customscripts.realtime import metrics
from customscripts.realtime.events import Event
from customscripts.realtime.subscriptions import Subscription, SubscriptionStore
from customscripts.realtime.versions import VersionFacts

if TYPE_CHECKING:
    from customscripts.registry.service import RegistryService

log = logs.get("customscripts.scheduler")

NO_PARAMS = params_hash({})  # dependencies are evaluated with params {}


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


def node_of(row: OutputRow) -> Node:
    return Node(row.tenant, row.script_id, row.version, row.params_hash, row.instrument_key, row.timeframe,
                float(row.time))


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
    group: tuple = ()  # what may share a sandboxed child with it: see assign_groups()
    attempts: int = 0  # failed attempts in this batch (invocation failed, or retryable)
    not_before: float = 0.0  # monotonic time of the next attempt
    failing_since: float = 0.0  # monotonic time of its first failed attempt
    row: OutputRow | None = None  # the output, once ok


class Planner:
    def __init__(self, registry: RegistryService, versions: VersionFacts,
                 subscriptions: SubscriptionStore | None) -> None:
        self.registry = registry
        self.versions = versions
        self.subscriptions = subscriptions
        self._phashes: dict[int, tuple[dict[str, Any], str]] = {}
        self._principals: dict[int, tuple[dict[str, Any], Principal]] = {}
        self._closures: dict[tuple[str, int], list[tuple[str, int]]] = {}

    def due(self, events: Sequence[Event]) -> list[tuple[Event, Subscription]]:
        assert self.subscriptions is not None, "a planner without subscriptions plans only given `due`"
        candles = [e for e in events if e.instrument_key]
        ticks = [e for e in events if not e.instrument_key]
        subs = self.subscriptions.due_many({(e.instrument_key, e.timeframe) for e in candles})
        by_key: dict[tuple[str, str], list[Subscription]] = defaultdict(list)
        for s in subs:
            by_key[(s.instrument_key, s.timeframe)].append(s)
        due = [(e, s) for e in candles for s in by_key.get((e.instrument_key, e.timeframe), ())]
        for tick in ticks:
            for s in self.subscriptions.due_timeframe(tick.timeframe):
                due.append((Event(s.instrument_key, s.timeframe, tick.time, tick.received), s))
        return due

    def plan(self, events: Sequence[Event], denied: list[tuple[Subscription, Principal, str]],
             due: Sequence[tuple[Event, Subscription]] | None = None
             ) -> tuple[dict[Node, Evaluation], dict[Node, list[Node]]]:
        """Due subscriptions (those of the events, or `due` as given: a series or a backfill) →
        evaluations (deduplicated per tenant) and their dependency edges; the subscriptions whose
        subscriber may not run the script go to `denied`."""
        allowed: dict[tuple, list[tuple[str, int]] | DomainError] = {}
        evals: dict[Node, Evaluation] = {}
        deps: dict[Node, list[Node]] = {}
        for event, sub in (self.due(events) if due is None else due):
            principal = self.principal(sub)
            key = (principal, sub.script_id, sub.version)
            if key not in allowed:
                try:
                    allowed[key] = self.registry.check_execution(principal, sub.script_id, sub.version)
                except DomainError as exc:  # 403/404/422: this subscriber may not run it any more
                    allowed[key] = exc
            closure = allowed[key]
            if isinstance(closure, DomainError):
                denied.append((sub, principal, closure.message[:500]))
                metrics.EVALUATIONS.labels("denied").inc()
                logs.event(log, "realtime evaluation denied", subscription=sub.id, script_id=sub.script_id,
                           version=sub.version, user=sub.user_id, reason=closure.message[:200])
                continue
            root = self._add(evals, deps, sub.tenant, sub.script_id, sub.version, sub.params, event, principal,
                             closure, self.params_hash(sub))
            evals[root].subscriptions.append(sub.id)
            evals[root].audience.add(sub.user_id)
        assign_groups(evals, deps)
        return evals, deps

    def _add(self, evals: dict[Node, Evaluation], deps: dict[Node, list[Node]], tenant: str, script_id: str,
             version: int, params: dict[str, Any], event: Event, principal: Principal,
             closure: list[tuple[str, int]], phash: str = NO_PARAMS) -> Node:
        node = Node(tenant, script_id, version, phash, event.instrument_key, event.timeframe, event.time)
        if node in evals:
            return node
        evals[node] = Evaluation(node, params, principal, closure)
        deps[node] = [self._add(evals, deps, tenant, dep_id, dep_ver, {}, event, principal,
                                self.closure(dep_id, dep_ver))
                      for dep_id, dep_ver in self.versions.dependencies(script_id, version)]
        return node

    def closure(self, script_id: str, version: int) -> list[tuple[str, int]]:
        """A published version's dependency closure as RegistryService.resolve_closure gives it (itself
        last), kept for the process: a published version's closure never changes, and planning asks for
        it once per dependency and event."""
        key = (script_id, version)
        found = self._closures.get(key)
        if found is None:
            found = self._closures[key] = self.registry.resolve_closure(script_id, version)
        return found

    def principal(self, sub: Subscription) -> Principal:
        """The subscriber's claims snapshot as a Principal, built once per subscription and snapshot."""
        cached = self._principals.get(sub.id)
        if cached is None or cached[0] != sub.principal or cached[1].user_id != sub.user_id \
                or cached[1].tenant != sub.tenant:
            cached = (sub.principal, sub.as_principal())
            self._principals[sub.id] = cached
        return cached[1]

    def params_hash(self, sub: Subscription) -> str:
        """A subscription's params hash, computed once per subscription and params (a hot loop)."""
        cached = self._phashes.get(sub.id)
        if cached is None or cached[0] != sub.params:
            cached = (sub.params, params_hash(sub.params))
            self._phashes[sub.id] = cached
        return cached[1]


def assign_groups(evals: dict[Node, Evaluation], deps: dict[Node, list[Node]]) -> None:
    """Each evaluation's audience (through dependents too) and its group (see the module docstring)."""
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
