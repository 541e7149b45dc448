"""The composition root: every long-lived service of a process, built once from one `Settings`.

Why one place: a module receives what it needs through its constructor and never looks a service
up from inside a method, so the import graph points one way (the API edge and the entry points ->
this module -> the services -> their stores) and a test can build any service from its own parts.
Only the edges use it: the registry-fn routes (`registry/api.py`), the scheduler's command line
(`realtime/scheduler.py`), the CLI, the demo and the tests.

Services are built on first use (registry-fn never builds the realtime evaluator; gateway-fn builds
nothing here) and shared by the process's threads, as the pools and clients inside them are.
"""

from __future__ import annotations

import copy
import functools

import redis

from customscripts import db
from customscripts.config import Settings, settings
from customscripts.execution import ExecuteSlots, Executor, Invoker, OnetimeResults
from customscripts.faas.budget import FunctionBudget, RedisLru
from customscripts.faas.client import OpenFaaSClient
from customscripts.outputs import OutputStore
from customscripts.realtime.evaluator import Evaluator
from customscripts.realtime.prefetch import MarketWindows
from customscripts.realtime.publisher import Publisher
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
        """The realtime service's and the publishers' client (latest values, streams): short timeouts,
        so an outage is a quick 503 rather than a hung request."""
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

    @functools.cached_property
    def invoker(self) -> Invoker:
        """A version's function: deployed within the function budget (its LRU shared in Redis), invoked."""
        client = OpenFaaSClient(self.cfg.provider_url, self.cfg.openfaas_user, self.cfg.openfaas_password)
        lru = RedisLru(redis.Redis(host=self.cfg.redis_host, port=self.cfg.redis_port))
        budget = FunctionBudget(client, lru=lru, pinned=self.subscriptions.pinned_functions)
        return Invoker(self.registry, client, budget, self.cfg)

    @functools.cached_property
    def executor(self) -> Executor:
        return Executor(self.invoker, OnetimeResults(db.pool()), ExecuteSlots(self.cfg))

    @functools.cached_property
    def history(self) -> History:
        """Series and backfill: the executor's invoker and slots, the gateway's read-only pool."""
        return History(self.executor, db.pool(self.cfg.pg_reader_dsn, max_size=2),
                       Publisher(self.redis, self.outputs))

    @functools.cached_property
    def realtime(self) -> RealtimeService:
        return RealtimeService(self.registry, self.subscriptions, self.outputs, self.redis, self.cfg,
                               invoker=self.invoker, history=self.history)

    def evaluator(self, cfg: Settings | None = None) -> Evaluator:
        """A realtime evaluator (`cfg`: the scheduler's settings, default the process's): the shared
        invoker seen through a budget of its own, pooled PostgreSQL, the Redis publisher, the candle
        windows through the gateway's read-only role."""
        cfg = cfg or self.cfg
        market = MarketWindows(db.pool(cfg.pg_reader_dsn, max_size=2))
        return Evaluator(with_own_budget(self.invoker), self.subscriptions, Publisher(self.redis, self.outputs), cfg,
                         market=market)


# The scheduler invokes versions with live subscriptions, which the budget never evicts; a function that
# vanished anyway (another replica, a provider restart) answers 404 and the Invoker redeploys it. So
# re-checking the deployment every 2 s (the budget's default: a Redis lock plus a function list per
# version, serialising the invoking threads) buys nothing there.
BUDGET_RECHECK_S = 60.0


def with_own_budget(invoker: Invoker) -> Invoker:
    """The same Invoker (registry, client, endpoints, the budget's state in Redis and its memory of
    what is deployed) whose budget re-checks deployments only every BUDGET_RECHECK_S: a shallow copy
    of it and of its budget, so the executor's budget keeps its own setting."""
    own = copy.copy(invoker)
    own.budget = copy.copy(invoker.budget)
    own.budget.cache_s = max(invoker.budget.cache_s, BUDGET_RECHECK_S)
    return own


@functools.cache
def app() -> App:
    """The process's services, from the process's settings."""
    return App(settings())
