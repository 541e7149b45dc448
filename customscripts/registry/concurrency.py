"""How many one-time executes may be in flight: per user and per tenant (Redis), per process (here).

Why: an execute holds its caller's request open for as long as the script runs (up to its wall
timeout). Without a bound, one tenant's executes fill registry-fn's workers and every tenant's API
calls queue behind them (issue 10, item 6).

- **Per user and per tenant, across replicas.** Each execute takes a lease in two Redis sorted sets
  (`cs:cc:exec:user:{tenant}:{user}`, `cs:cc:exec:tenant:{tenant}`), member = the lease id, score =
  when it expires. One Lua script drops expired leases, checks both counts against the caller's
  tier (`max_concurrent_executes_per_user` / `_per_tenant`) and adds the lease to both or to
  neither. A lease lasts the version's wall timeout plus `CS_EXECUTE_LEASE_SLACK_S`, so a replica
  that dies while holding one gives it back on its own; a live one releases it in a `finally`.
  Over the limit: 429 `too_many_concurrent_executes` with Retry-After, before any function is
  invoked. Redis unavailable: 503 (fail closed, like the data gateway's rate limiter).
- **Per process.** At most `CS_EXECUTE_MAX_INFLIGHT` executes wait on functions at once in one
  registry-fn process, fewer than its worker threads (`CS_FN_THREADS`), so executes can never take
  every worker: the rest of the API always has `CS_FN_THREADS - CS_EXECUTE_MAX_INFLIGHT` of them.
  Full: 503 `execute_capacity` with Retry-After (another replica may have room). A tenant's cap is
  below the process cap, so one tenant alone cannot fill it. Why a cap in the handler rather than a
  separate worker pool for executes: it holds under any server that runs the handler without the
  server knowing routes.
"""

from __future__ import annotations

import contextlib
import math
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from customscripts.auth import Principal
from customscripts.config import Settings, Tier
from customscripts.errors import Throttled, Unavailable

KEY_PREFIX = "cs:cc:exec"

# KEYS: lease sets. ARGV: lease_ms, slack_ms, member, then one limit per key.
# Returns {1, 0, 0} when the lease was taken, else {0, retry_after_ms, index of the full set}.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, slack, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local wait, full = -1, 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    -- a holder normally ends at its wall timeout, `slack` before its lease runs out
    local left = first[2] and math.max(0, tonumber(first[2]) - now - slack) or 0
    if wait < 0 or left < wait then wait = left; full = i end
  end
end
if full > 0 then return {0, wait, full} end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, member)
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
end
return {1, 0, 0}
"""


def user_key(tenant: str, user_id: str) -> str:
    return f"{KEY_PREFIX}:user:{tenant}:{user_id}"


def tenant_key(tenant: str) -> str:
    return f"{KEY_PREFIX}:tenant:{tenant}"


@dataclass(frozen=True)
class Lease:
    """One execute's place in its user's and tenant's sets."""

    member: str
    keys: tuple[str, ...]


class ExecuteSlots:
    """The concurrency limits of one-time executes (module docstring)."""

    def __init__(self, cfg: Settings, client: redis.Redis | None = None) -> None:
        self.cfg = cfg
        self.redis = client or redis.Redis(host=cfg.redis_host, port=cfg.redis_port, socket_timeout=2,
                                           socket_connect_timeout=2)
        self._acquire = self.redis.register_script(_ACQUIRE_LUA)
        # never every worker thread of the process, whatever the configuration says
        self.max_inflight = max(1, min(cfg.execute_max_inflight, cfg.fn_threads - 1))
        self._local = threading.BoundedSemaphore(self.max_inflight)

    def acquire(self, principal: Principal, tier: Tier, lease_s: float, call_id: str) -> Lease:
        """Take a lease for one execute (429 over the user's or tenant's limit)."""
        keys = (user_key(principal.tenant, principal.user_id), tenant_key(principal.tenant))
        limits = (tier.max_concurrent_executes_per_user, tier.max_concurrent_executes_per_tenant)
        lease = Lease(f"{call_id[:128]}:{uuid.uuid4().hex}", keys)
        lease_ms = max(1, math.ceil(lease_s * 1000))
        slack_ms = math.ceil(self.cfg.execute_lease_slack_s * 1000)
        try:
            taken, wait_ms, full = self._acquire(keys=list(keys), args=[lease_ms, slack_ms, lease.member, *limits])
        except redis.RedisError as exc:
            raise Unavailable(f"execute concurrency limiter unavailable: {type(exc).__name__}",
                              code="concurrency_unavailable", retry_after_s=1) from None
        if not taken:
            scope = ("user", "tenant")[int(full) - 1]
            limit = limits[int(full) - 1]
            retry = max(1, math.ceil(int(wait_ms) / 1000))
            raise Throttled(
                f"too many concurrent executes for this {scope} (limit {limit}); retry after {retry}s",
                code="too_many_concurrent_executes", retry_after_s=retry,
                details={"scope": scope, "limit": limit, "retry_after_s": retry})
        return lease

    def release(self, lease: Lease) -> None:
        """Give the lease back; if Redis is away it expires on its own."""
        with contextlib.suppress(redis.RedisError):
            pipe = self.redis.pipeline(transaction=False)
            for key in lease.keys:
                pipe.zrem(key, lease.member)
            pipe.execute()

    @contextlib.contextmanager
    def in_process(self) -> Iterator[None]:
        """A place in this process for the body of the `with` (503 `execute_capacity` when full)."""
        if not self._local.acquire(blocking=False):
            raise Unavailable(
                f"this registry replica already runs {self.max_inflight} executes; retry shortly",
                code="execute_capacity", retry_after_s=1, details={"max_inflight": self.max_inflight})
        try:
            yield
        finally:
            self._local.release()

    @contextlib.contextmanager
    def hold(self, principal: Principal, tier: Tier, lease_s: float, call_id: str) -> Iterator[None]:
        """Hold a lease and a place in this process for the body of the `with`; both always returned."""
        lease = self.acquire(principal, tier, lease_s, call_id)
        try:
            with self.in_process():
                yield
        finally:
            self.release(lease)
