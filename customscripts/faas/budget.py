"""The function budget: at most N script functions deployed, least-recently-used ones evicted.

OpenFaaS CE allows 15 functions, Standard 500 (docs/openfaas.md §7), while the platform publishes
one function per script version. So the registry keeps a budget (`function_budget`): versions with
live subscriptions are pinned and stay deployed, idle ones are evicted least-recently-used, and an
evicted version is redeployed on demand by `ensure_deployed`.

The gateway's function list is the truth for *what is deployed*; last use is kept in a Redis sorted
set (`cs:functions:lru`, score = unix time) with a Redis lock around eviction, so several registry
replicas agree on the order and never evict concurrently. `MemoryLru` is the single-process variant.
Only functions labelled `com.customscripts.kind=script` count; platform functions are never evicted.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from customscripts import logs
from customscripts.config import settings
from customscripts.errors import ServiceUnavailable
from customscripts.faas.client import FunctionNotFound, OpenFaaSClient
from customscripts.faas.naming import function_name

log = logs.get("customscripts.faas.budget")

LRU_KEY = "cs:functions:lru"
LOCK_KEY = "cs:functions:lock"
KIND_LABEL = "com.customscripts.kind"


class BudgetExhausted(ServiceUnavailable):
    code = "function_budget_exhausted"


class LruStore(Protocol):
    def touch(self, name: str, when: float | None = None) -> None: ...
    def remove(self, name: str) -> None: ...
    def scores(self, names: Iterable[str]) -> dict[str, float]: ...
    def lock(self) -> contextlib.AbstractContextManager[None]: ...


class MemoryLru:
    """Last-use times in this process (one registry replica, tests)."""

    def __init__(self) -> None:
        self._scores: dict[str, float] = {}
        self._lock = threading.RLock()

    def touch(self, name: str, when: float | None = None) -> None:
        self._scores[name] = time.time() if when is None else when

    def remove(self, name: str) -> None:
        self._scores.pop(name, None)

    def scores(self, names: Iterable[str]) -> dict[str, float]:
        return {n: self._scores.get(n, 0.0) for n in names}

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return self._lock


class RedisLru:
    """Last-use times in a Redis sorted set shared by every registry replica, plus a short lease lock."""

    def __init__(self, client: Any = None, key: str = LRU_KEY, lock_key: str = LOCK_KEY,
                 lock_ttl_ms: int = 60_000) -> None:
        if client is None:
            import redis

            client = redis.Redis.from_url(settings().redis_url)
        self.redis = client
        self.key = key
        self.lock_key = lock_key
        self.lock_ttl_ms = lock_ttl_ms

    def touch(self, name: str, when: float | None = None) -> None:
        self.redis.zadd(self.key, {name: time.time() if when is None else when})

    def remove(self, name: str) -> None:
        self.redis.zrem(self.key, name)

    def scores(self, names: Iterable[str]) -> dict[str, float]:
        names = list(names)
        if not names:
            return {}
        values = self.redis.zmscore(self.key, names)
        return {n: float(v) if v is not None else 0.0 for n, v in zip(names, values, strict=True)}

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.lock_ttl_ms / 1000
        while not self.redis.set(self.lock_key, token, nx=True, px=self.lock_ttl_ms):
            if time.monotonic() > deadline:
                raise BudgetExhausted("timed out waiting for the function budget lock")
            time.sleep(0.01)
        try:
            yield
        finally:  # release only our own lease
            self.redis.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
                            "end return 0", 1, self.lock_key, token)


class FunctionBudget:
    """`ensure_deployed(script_id, version, deploy_fn)`: deploy within the budget, evicting LRU idle ones."""

    def __init__(self, client: OpenFaaSClient, *, budget: int | None = None,
                 pinned: Callable[[], Iterable[str]] | None = None, lru: LruStore | None = None,
                 cache_s: float = 2.0, touch_every_s: float = 1.0) -> None:
        self.client = client
        self.budget = settings().function_budget if budget is None else budget
        self.pinned = pinned or (lambda: ())
        self.lru: LruStore = lru if lru is not None else MemoryLru()
        self.cache_s = cache_s
        self.touch_every_s = touch_every_s
        self._known: dict[str, float] = {}  # name -> when we last saw it deployed (monotonic)
        self._touched: dict[str, float] = {}

    # ---- hot path

    def touch(self, name: str) -> None:
        """Record a use; throttled so a hot function costs one Redis write per `touch_every_s`."""
        now = time.monotonic()
        if now - self._touched.get(name, -1e9) >= self.touch_every_s:
            self.lru.touch(name)
            self._touched[name] = now

    def forget(self, name: str) -> None:
        """Call when an invocation says the function is gone (evicted by another replica)."""
        self._known.pop(name, None)

    def deployed(self) -> list[str]:
        """Script functions currently deployed, per the gateway (platform functions excluded)."""
        return sorted(f["name"] for f in self.client.list()
                      if (f.get("labels") or {}).get(KIND_LABEL) == "script")

    def ensure_deployed(self, script_id: str, version: int, deploy_fn: Callable[[], Any]) -> str:
        """The function name of the version, deployed; evicts LRU unpinned functions to make room.

        `deploy_fn()` builds and deploys the version (e.g. render_context + client.deploy). Raises
        BudgetExhausted (503) when the budget is full of pinned versions.
        """
        name = function_name(script_id, version)
        now = time.monotonic()
        if now - self._known.get(name, -1e9) < self.cache_s:
            self.touch(name)
            return name
        with self.lru.lock():
            current = self.deployed()
            if name not in current:
                self._make_room(name, current)
                logs.event(log, "deploying function", function=name)
                deploy_fn()
            self.lru.touch(name)
            self._touched[name] = time.monotonic()
        self._known[name] = time.monotonic()
        return name

    def _make_room(self, name: str, current: list[str]) -> None:
        if self.budget <= 0:
            raise BudgetExhausted("the function budget is 0: no script function may be deployed")
        pinned = set(self.pinned())
        pinned.add(name)
        deployed = list(current)
        while len(deployed) >= self.budget:
            candidates = [n for n in deployed if n not in pinned]
            if not candidates:
                raise BudgetExhausted(
                    f"function budget of {self.budget} is full and every deployed version has live "
                    "subscriptions; raise CS_FUNCTION_BUDGET or retry later",
                    headers={"Retry-After": "30"},
                )
            scores = self.lru.scores(candidates)
            victim = min(candidates, key=lambda n: (scores[n], n))
            logs.event(log, "evicting idle function", function=victim, last_used=scores[victim],
                       budget=self.budget, deployed=len(deployed))
            with contextlib.suppress(FunctionNotFound):
                self.client.delete(victim)
            self.lru.remove(victim)
            self._known.pop(victim, None)
            deployed.remove(victim)
