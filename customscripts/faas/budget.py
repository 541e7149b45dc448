"""The function budget: at most N script functions deployed, and no tenant holding more than its share.

OpenFaaS CE allows 15 functions, Standard 500 (docs/openfaas.md §7), while the platform publishes
one function per script version. So the registry keeps a budget (`function_budget`): versions with
live subscriptions are pinned and stay deployed, idle ones are evicted least-recently-used, and an
evicted version is redeployed on demand by `ensure_deployed`.

Per tenant. A tenant *holds* the functions it invoked (one-time executes, and the scheduler's
evaluations of its subscriptions) and *pins* the functions of its live subscriptions, dependencies
included. Held and pinned together never exceed the tenant's share (`function_tenant_share`, by
default a third of the budget). A tenant at its share that needs another function makes room by
releasing its own least-recently-used unpinned one; when everything in its share is pinned it gets
`TenantShareFull` (429 with Retry-After) — it never takes a slot another tenant holds. Below its
share it may take a free slot, or the least-recently-used unpinned slot of the whole budget (an
idle function, redeployed on demand). Subscribing checks the same share first (realtime/service.py),
and all tenants' pins together stay within `function_pin_limit`, so executes always find a slot.

A function is shared by every tenant that uses the version (a marketplace script's subscribers, a
team's users): it is charged to *each* tenant that holds or pins it, never to its author, and is
deleted only when no tenant holds it and none pins it. So a tenant cannot reach beyond its share
through other tenants' scripts, and its buyers cannot use up an author's share.

State lives in Redis, shared by every registry-fn replica and scheduler: the deployed slots
(`cs:functions:lru`, a sorted set scored by last use), each tenant's holdings
(`cs:functions:lru:tenant:<tenant>`, scored by that tenant's last use) and each function's holders
(`cs:functions:lru:holders:<function>`). One Lua script decides and records a grant atomically (what
to release, what to evict, the new hold), so concurrent replicas can never both fill the same last
slot of a share or of the budget. The gateway's function list stays the truth for *what is
deployed*; gateway changes (delete the evicted, deploy the new) happen under a short Redis lease
lock. Pins come from PostgreSQL (the subscriptions) and are passed in. Only functions labelled
`com.customscripts.kind=script` count; platform functions are never evicted.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from customscripts import logs, metrics
from customscripts.config import settings
from customscripts.errors import Throttled, Unavailable
from customscripts.faas.client import FunctionNotFound, OpenFaaSClient
from customscripts.faas.naming import function_name

log = logs.get("customscripts.faas.budget")

LRU_KEY = "cs:functions:lru"
LOCK_KEY = "cs:functions:lock"
KIND_LABEL = "com.customscripts.kind"
RETRY_AFTER_S = 30

Pins = Mapping[str, Iterable[str]]  # tenant -> functions its live subscriptions pin


class BudgetExhausted(Unavailable):
    code = "function_budget_exhausted"


class TenantShareFull(Throttled):
    """The tenant's share of the function budget is all pinned by its own subscriptions."""

    code = "tenant_function_share_full"


# KEYS: slots, the tenant's holdings. ARGV: function, tenant, now, share, budget, tenant key prefix,
# holders key prefix, the tenant's pins (JSON list), every tenant's pins (JSON list).
# Returns {"held"} | {"ok", <function to delete>...} | {"tenant_full", <pinned>} | {"budget_full"}.
# Decides first, then writes: a refusal changes nothing.
_ACQUIRE = """
local slots, mine = KEYS[1], KEYS[2]
local name, tenant, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local share, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local tenant_prefix, holders_prefix = ARGV[6], ARGV[7]
local pinned_mine, pinned_any = {}, {}
local pinned_count = 0
for _, n in ipairs(cjson.decode(ARGV[8])) do
  if not pinned_mine[n] then pinned_mine[n] = true; pinned_count = pinned_count + 1 end
end
for _, n in ipairs(cjson.decode(ARGV[9])) do pinned_any[n] = true end

if redis.call('ZSCORE', mine, name) then
  redis.call('ZADD', mine, now, name)
  redis.call('ZADD', slots, now, name)
  return {'held'}
end

-- the tenant's share: what it holds, what it pins and the new one
local held = redis.call('ZRANGE', mine, 0, -1)
local charged = pinned_count
for _, n in ipairs(held) do if not pinned_mine[n] then charged = charged + 1 end end
if not pinned_mine[name] then charged = charged + 1 end
local release = {}
local i = 1
while charged > share do
  while i <= #held and pinned_mine[held[i]] do i = i + 1 end
  if i > #held then
    -- only pins left: a pinned version was admitted by subscribe (pins from before a lower share keep
    -- working until unsubscribed); anything else does not fit
    if pinned_mine[name] then break end
    return {'tenant_full', tostring(pinned_count)}
  end
  table.insert(release, held[i]); i = i + 1; charged = charged - 1
end

-- releasing a function nobody else holds and nobody pins frees its slot
local freed = {}
local nfreed = 0
for _, n in ipairs(release) do
  local others = redis.call('SCARD', holders_prefix .. n) - redis.call('SISMEMBER', holders_prefix .. n, tenant)
  if others == 0 and not pinned_any[n] then freed[n] = true; nfreed = nfreed + 1 end
end

-- the budget: a new slot, else the least recently used unpinned slot of anyone
local evict = {}
if not redis.call('ZSCORE', slots, name) then
  local used = redis.call('ZCARD', slots) - nfreed
  if used >= budget then
    for _, n in ipairs(redis.call('ZRANGE', slots, 0, -1)) do
      if used < budget then break end
      if not pinned_any[n] and not freed[n] then table.insert(evict, n); used = used - 1 end
    end
    if used >= budget then return {'budget_full'} end
  end
end

local out = {'ok'}
for _, n in ipairs(release) do
  redis.call('ZREM', mine, n)
  redis.call('SREM', holders_prefix .. n, tenant)
  if freed[n] then
    redis.call('ZREM', slots, n); redis.call('DEL', holders_prefix .. n); table.insert(out, n)
  end
end
for _, n in ipairs(evict) do
  for _, t in ipairs(redis.call('SMEMBERS', holders_prefix .. n)) do redis.call('ZREM', tenant_prefix .. t, n) end
  redis.call('DEL', holders_prefix .. n); redis.call('ZREM', slots, n); table.insert(out, n)
end
redis.call('ZADD', mine, now, name)
redis.call('SADD', holders_prefix .. name, tenant)
redis.call('ZADD', slots, now, name)
return out
"""

# KEYS: slots, the tenant's holdings. ARGV: function, tenant, holders key prefix, pinned by anyone (0|1).
# Drops the tenant's hold (a deploy that failed); the slot goes when nobody else holds it.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', ARGV[3] .. ARGV[1], ARGV[2])
if redis.call('SCARD', ARGV[3] .. ARGV[1]) == 0 and ARGV[4] == '0' then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: slots, the tenant's holdings. ARGV: function, now. Last use, only for what the tenant still
# holds (never re-creates a hold another replica released); 1 when held.
_TOUCH = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
  return 1
end
return 0
"""


class RedisLru:
    """Slots, holdings and last use in Redis, shared by every registry replica and scheduler, plus a
    short lease lock for the gateway changes."""

    def __init__(self, client: Any = None, key: str = LRU_KEY, lock_key: str = LOCK_KEY,
                 lock_ttl_ms: int = 60_000) -> None:
        if client is None:
            import redis

            client = redis.Redis.from_url(settings().redis_url)
        self.redis = client
        self.key = key
        self.lock_key = lock_key
        self.lock_ttl_ms = lock_ttl_ms
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._touch = client.register_script(_TOUCH)

    def tenant_key(self, tenant: str) -> str:
        return f"{self.key}:tenant:{tenant}"

    def holders_key(self, name: str) -> str:
        return f"{self.key}:holders:{name}"

    def acquire(self, tenant: str, name: str, *, share: int, budget: int, pinned_by_tenant: Iterable[str],
                pinned: Iterable[str]) -> list[str]:
        """Record `tenant`'s hold on `name` within its share and the budget, atomically; returns the
        functions whose slots it freed (to delete now). Raises TenantShareFull / BudgetExhausted
        (nothing recorded) when it cannot fit."""
        reply = self._acquire(keys=[self.key, self.tenant_key(tenant)],
                              args=[name, tenant, time.time(), share, budget, self.tenant_key(""),
                                    self.holders_key(""), json.dumps(sorted(set(pinned_by_tenant))),
                                    json.dumps(sorted(set(pinned)))])
        verdict = _text(reply[0])
        if verdict == "held":
            return []
        if verdict == "tenant_full":
            pins = int(_text(reply[1]))
            raise TenantShareFull(
                f"tenant {tenant!r} already uses its whole share of {share} script functions for versions "
                f"its live subscriptions pin ({pins}); unsubscribe from some, or retry later",
                details={"tenant_function_share": share, "pinned": pins, "function": name},
                retry_after_s=RETRY_AFTER_S)
        if verdict == "budget_full":
            raise BudgetExhausted(
                f"function budget of {budget} is full and every deployed version has live subscriptions; "
                "raise CS_FUNCTION_BUDGET or retry later",
                details={"function_budget": budget}, retry_after_s=RETRY_AFTER_S)
        return [_text(n) for n in reply[1:]]

    def release(self, tenant: str, name: str, *, pinned: bool) -> None:
        self._release(keys=[self.key, self.tenant_key(tenant)],
                      args=[name, tenant, self.holders_key(""), "1" if pinned else "0"])

    def touch(self, tenant: str, name: str) -> bool:
        """Record a use of what the tenant holds; False when it holds no such function."""
        return bool(self._touch(keys=[self.key, self.tenant_key(tenant)], args=[name, time.time()]))

    def held(self, tenant: str) -> list[str]:
        """The tenant's holdings, least recently used first."""
        return [_text(n) for n in self.redis.zrange(self.tenant_key(tenant), 0, -1)]

    def slots(self) -> list[str]:
        """Every function the budget counts as deployed, least recently used first."""
        return [_text(n) for n in self.redis.zrange(self.key, 0, -1)]

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.lock_ttl_ms / 1000
        while not self.redis.set(self.lock_key, token, nx=True, px=self.lock_ttl_ms):
            if time.monotonic() > deadline:
                raise BudgetExhausted("timed out waiting for the function budget lock",
                                      retry_after_s=1)
            time.sleep(0.01)
        try:
            yield
        finally:  # release only our own lease
            self.redis.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
                            "end return 0", 1, self.lock_key, token)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FunctionBudget:
    """`ensure_deployed(tenant, script_id, version, deploy_fn)`: deploy within the budget and the
    tenant's share, evicting least-recently-used unpinned functions."""

    def __init__(self, client: OpenFaaSClient, *, budget: int | None = None, tenant_share: int | None = None,
                 pinned: Callable[[], Pins] | None = None, lru: RedisLru | None = None,
                 cache_s: float = 2.0, touch_every_s: float = 1.0) -> None:
        cfg = settings()
        self.client = client
        self.budget = cfg.function_budget if budget is None else budget
        share = cfg.function_tenant_share if tenant_share is None else tenant_share
        self.tenant_share = max(1, min(share, self.budget)) if self.budget > 0 else 0
        self.pinned: Callable[[], Pins] = pinned or dict
        self.lru = lru if lru is not None else RedisLru()
        self.cache_s = cache_s
        self.touch_every_s = touch_every_s
        self._known: dict[tuple[str, str], float] = {}  # (tenant, name) -> when granted and seen deployed
        self._touched: dict[tuple[str, str], float] = {}

    # ---- hot path

    def touch(self, tenant: str, name: str) -> None:
        """Record a use; throttled so a hot function costs one Redis call per `touch_every_s`."""
        now = time.monotonic()
        if now - self._touched.get((tenant, name), -1e9) >= self.touch_every_s:
            self.lru.touch(tenant, name)
            self._touched[(tenant, name)] = now

    def forget(self, name: str) -> None:
        """Call when an invocation says the function is gone (evicted by another replica)."""
        for key in [k for k in self._known if k[1] == name]:
            self._known.pop(key, None)

    def deployed(self) -> list[str]:
        """Script functions currently deployed, per the gateway (platform functions excluded)."""
        return sorted(f["name"] for f in self.client.list()
                      if (f.get("labels") or {}).get(KIND_LABEL) == "script")

    def ensure_deployed(self, tenant: str, script_id: str, version: int, deploy_fn: Callable[[], Any]) -> str:
        """The function name of the version, deployed and held by `tenant`.

        `deploy_fn()` builds and deploys the version (e.g. render_context + client.deploy). Raises
        TenantShareFull (429) when the tenant's share is all pinned, BudgetExhausted (503) when the
        budget is all pinned.
        """
        name = function_name(script_id, version)
        now = time.monotonic()
        if now - self._known.get((tenant, name), -1e9) < self.cache_s:
            self.touch(tenant, name)
            return name
        if self.budget <= 0:
            raise BudgetExhausted("the function budget is 0: no script function may be deployed")
        with self.lru.lock():
            pinned_any: set[str] = set()
            if not self.lru.touch(tenant, name):  # a new hold: the pins decide what may make room
                pins = {t: set(names) for t, names in self.pinned().items()}
                pinned_any = set().union(*pins.values()) if pins else set()
                freed = self.lru.acquire(tenant, name, share=self.tenant_share, budget=self.budget,
                                         pinned_by_tenant=pins.get(tenant, ()), pinned=pinned_any)
                for victim in freed:
                    logs.event(log, "evicting idle function", function=victim, tenant=tenant,
                               budget=self.budget, tenant_share=self.tenant_share, for_function=name)
                    with contextlib.suppress(FunctionNotFound):
                        self.client.delete(victim)
                    self.forget(victim)
                    metrics.BUDGET_EVICTIONS.labels("lru").inc()
            current = self.deployed()
            metrics.BUDGET_DEPLOYED.set(len(current))
            if name not in current:
                self._drop_untracked(current, name, pinned_any)
                logs.event(log, "deploying function", function=name, tenant=tenant)
                try:
                    deploy_fn()
                    metrics.BUDGET_DEPLOYS.inc()
                except BaseException:
                    self.lru.release(tenant, name, pinned=name in pinned_any)
                    raise
        self._known[(tenant, name)] = self._touched[(tenant, name)] = time.monotonic()
        return name

    def _drop_untracked(self, current: list[str], name: str, pinned: set[str]) -> None:
        """Deployed script functions the slots do not know (deployed before the budget tracked them, or
        Redis lost its data) still count against the gateway's own limit: delete them, unpinned first,
        while deploying `name` would exceed the budget. The 404 path redeploys any still wanted."""
        tracked = set(self.lru.slots())
        untracked = sorted((n for n in current if n not in tracked and n != name), key=lambda n: (n in pinned, n))
        excess = len(current) + 1 - self.budget
        for victim in untracked[:max(0, excess)]:
            logs.event(log, "deleting untracked function", function=victim, budget=self.budget)
            with contextlib.suppress(FunctionNotFound):
                self.client.delete(victim)
            self.forget(victim)
            metrics.BUDGET_EVICTIONS.labels("untracked").inc()
