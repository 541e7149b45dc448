"""The composition root: every long-lived service of a process, built once from one `Settings`.

Why one place: a module receives what it needs through its constructor and never looks a service
up from inside a method, so the import graph points one way (the API edge and the entry points ->
this module -> the services -> their stores) and a test can build any service from its own parts.
Only the edges use it: the registry-fn routes (`registry/api.py`), the scheduler's entry point,
the CLI and the demo.

Services are built on first use (registry-fn never builds the realtime evaluator; gateway-fn builds
nothing here) and shared by the process's threads, as the pools and clients inside them are.
"""

from __future__ import annotations

import functools

import redis

from customscripts import db
from customscripts.config import Settings, settings
from customscripts.execution import ExecuteSlots, Executor, Invoker, OnetimeResults
from customscripts.faas.budget import FunctionBudget, RedisLru
from customscripts.faas.client import OpenFaaSClient
from customscripts.outputs import OutputStore
from customscripts.realtime.publisher import Publisher
from customscripts.realtime.scheduler import BUDGET_RECHECK_S, Evaluator, build_evaluator
from customscripts.realtime.service import RealtimeService
from customscripts.realtime.subscriptions import SubscriptionStore
from customscripts.registry.service import RegistryService
from customscripts.series import History


class App:
    """The services of one process. Attributes are built on first use, then shared."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg

    @functools.cached_property
    def redis(self) -> redis.Redis:
        """Latest values, streams, the concurrency leases' neighbours: short timeouts, so an outage is
        a quick 503 rather than a hung request."""
        return redis.Redis(host=self.cfg.redis_host, port=self.cfg.redis_port, socket_timeout=5,
                           socket_connect_timeout=2)

    @functools.cached_property
    def registry(self) -> RegistryService:
        service = RegistryService(self.cfg)
        service.store.ensure_bucket()
        return service

    @functools.cached_property
    def subscriptions(self) -> SubscriptionStore:
        return SubscriptionStore(db.pool())

    @functools.cached_property
    def outputs(self) -> OutputStore:
        return OutputStore(db.pool())

    def budget(self, *, cache_s: float | None = None) -> FunctionBudget:
        """A function budget over the shared LRU in Redis; `cache_s`: how long a deployment check is
        trusted (the scheduler's evaluator trusts it longer: its versions are pinned)."""
        client = OpenFaaSClient(self.cfg.provider_url, self.cfg.openfaas_user, self.cfg.openfaas_password)
        budget = FunctionBudget(client, lru=RedisLru(redis.Redis(host=self.cfg.redis_host, port=self.cfg.redis_port)),
                                pinned=self.subscriptions.pinned_functions)
        if cache_s is not None:
            budget.cache_s = max(budget.cache_s, cache_s)
        return budget

    def invoker(self, *, cache_s: float | None = None) -> Invoker:
        budget = self.budget(cache_s=cache_s)
        return Invoker(self.registry, budget.client, budget, self.cfg)

    @functools.cached_property
    def executor(self) -> Executor:
        return Executor(self.invoker(), OnetimeResults(db.pool()), ExecuteSlots(self.cfg))

    @functools.cached_property
    def history(self) -> History:
        """Series and backfill: the executor's invoker and slots, the gateway's read-only pool."""
        return History(self.executor, db.pool(self.cfg.pg_reader_dsn, max_size=2),
                       Publisher(self.redis, self.outputs))

    @functools.cached_property
    def realtime(self) -> RealtimeService:
        return RealtimeService(self.registry, self.subscriptions, self.outputs, self.redis, self.cfg,
                               invoker=self.executor.invoker, history=self.history)

    def evaluator(self, cfg: Settings | None = None) -> Evaluator:
        """A realtime evaluator with an invoker of its own. Its versions have live subscriptions, which
        the budget never evicts; one that vanished anyway answers 404 and is redeployed, so re-checking
        the deployment every few seconds buys nothing here (BUDGET_RECHECK_S)."""
        return build_evaluator(cfg or self.cfg, invoker=self.invoker(cache_s=BUDGET_RECHECK_S))


@functools.cache
def app() -> App:
    """The process's services, from the process's settings."""
    return App(settings())
