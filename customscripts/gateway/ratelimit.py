"""Per-user and per-script token buckets in Redis, checked and consumed atomically by one Lua script.

A read costs one token from the user's bucket and one from the script's bucket; it is allowed only if
both have one, so a refused read consumes nothing. Buckets are sized by the caller's tier
(`rate_per_minute`, `burst`); a script's bucket (shared by every user of that script in a tenant) is
SCRIPT_FACTOR times larger so one hot shared script cannot starve the tenant, yet no single user gets
past their own tier. The clock is Redis's own (TIME) unless the caller passes one, which keeps several
gateway replicas consistent and lets tests drive time explicitly.

Realtime evaluations (execution tokens minted by the scheduler, claim `rt`) use separate buckets sized
by the tier's `realtime_rate_per_minute`/`realtime_burst`: their volume is bounded by the user's
subscriptions (`max_subscriptions`) times the event rate, and must neither starve the user's
interactive reads nor be starved by them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import redis

from customscripts.config import Settings, Tier
from customscripts.errors import Forbidden, Throttled, Unavailable

SCRIPT_FACTOR = 10
KEY_PREFIX = "cs:rl:gw"

# KEYS: bucket keys. ARGV: now (seconds, "" = Redis TIME), cost, then (rate_per_s, capacity) per key.
# Returns {allowed (0/1), retry_after_ms}.
_LUA = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local cost = tonumber(ARGV[2])
local levels = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[1 + 2 * i])
  local cap = tonumber(ARGV[2 + 2 * i])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = cap
    ts = now
  end
  if now > ts then
    tokens = math.min(cap, tokens + (now - ts) * rate)
    ts = now
  end
  levels[i] = {tokens, ts, rate, cap}
  if tokens < cost then
    local need = (cost - tokens) / rate
    if need > wait then wait = need end
  end
end
if wait > 0 then
  return {0, math.ceil(wait * 1000)}
end
for i, key in ipairs(KEYS) do
  local l = levels[i]
  redis.call('HSET', key, 'tokens', tostring(l[1] - cost), 'ts', tostring(l[2]))
  redis.call('PEXPIRE', key, math.ceil(l[4] / l[3] * 1000) + 1000)
end
return {1, 0}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float


class RateLimiter:
    """Token buckets per (tenant, user) and per (tenant, script id), sized by the caller's tier."""

    def __init__(self, cfg: Settings, client: redis.Redis | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.redis = client or redis.Redis(host=cfg.redis_host, port=cfg.redis_port, socket_timeout=2,
                                           socket_connect_timeout=2)
        self.clock = clock
        self._script = self.redis.register_script(_LUA)

    def _request(self, *, tenant: str, user: str, script_id: str, tier_name: str, cost: int,
                 realtime: bool) -> tuple[list[str], list[object]]:
        """The Lua call's keys and arguments for one read; 403/429 when the tier allows no reads."""
        tier: Tier | None = self.cfg.tier(tier_name)
        if tier is None:
            raise Forbidden(f"unknown tier {tier_name!r}", code="unknown_tier")
        per_minute, burst = ((tier.realtime_rate_per_minute, tier.realtime_burst) if realtime
                             else (tier.rate_per_minute, tier.burst))
        if per_minute <= 0 or burst <= 0:
            kind = "realtime " if realtime else ""
            raise Throttled(f"tier {tier_name!r} has no {kind}data-gateway allowance", code="rate_limited",
                            retry_after_s=3600)
        rate = per_minute / 60.0
        prefix = f"{KEY_PREFIX}:rt" if realtime else KEY_PREFIX
        keys = [f"{prefix}:user:{tenant}:{user}", f"{prefix}:script:{tenant}:{script_id}"]
        now = "" if self.clock is None else repr(float(self.clock()))
        return keys, [now, cost, rate, burst, rate * SCRIPT_FACTOR, burst * SCRIPT_FACTOR]

    def check(self, *, tenant: str, user: str, script_id: str, tier_name: str, cost: int = 1,
              realtime: bool = False) -> Decision:
        keys, args = self._request(tenant=tenant, user=user, script_id=script_id, tier_name=tier_name,
                                   cost=cost, realtime=realtime)
        try:
            allowed, wait_ms = self._script(keys=keys, args=args)
        except redis.RedisError as exc:  # fail closed but retryable: no unmetered reads
            raise _unavailable(exc) from None
        return Decision(bool(allowed), int(wait_ms) / 1000.0)

    def begin(self, *, tenant: str, user: str, script_id: str, tier_name: str, cost: int = 1,
              realtime: bool = False) -> PendingDecision:
        """Send the check and return at once; `PendingDecision.decision()` reads the answer. The
        caller's own work (the gateway's query) runs during the Redis round trip."""
        keys, args = self._request(tenant=tenant, user=user, script_id=script_id, tier_name=tier_name,
                                   cost=cost, realtime=realtime)
        pool = self.redis.connection_pool
        try:
            conn = pool.get_connection()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None
        try:
            conn.send_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
        except redis.RedisError as exc:
            conn.disconnect()
            pool.release(conn)
            raise _unavailable(exc) from None
        return PendingDecision(pool, conn, lambda: self._script(keys=keys, args=args))

    def enforce(self, **kwargs: object) -> None:
        """Raise 429 with Retry-After (whole seconds, at least 1) when the read is over the limit."""
        raise_if_refused(self.check(**kwargs))  # type: ignore[arg-type]


class PendingDecision:
    """A check sent on its own pooled connection, answer not yet read. decision() must be called
    exactly once: it reads the answer and gives the connection back."""

    def __init__(self, pool: redis.ConnectionPool, conn: redis.Connection,
                 again: Callable[[], tuple[int, int]]) -> None:
        self._pool = pool
        self._conn: redis.Connection | None = conn
        self._again = again

    def decision(self) -> Decision:
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("decision() already read")
        try:
            allowed, wait_ms = conn.read_response()
        except redis.exceptions.NoScriptError:  # Redis restarted (scripts are not persisted): load, run
            try:
                allowed, wait_ms = self._again()
            except redis.RedisError as exc:
                raise _unavailable(exc) from None
        except redis.RedisError as exc:
            conn.disconnect()
            raise _unavailable(exc) from None
        finally:
            self._pool.release(conn)
        return Decision(bool(allowed), int(wait_ms) / 1000.0)


def raise_if_refused(decision: Decision) -> None:
    if not decision.allowed:
        retry = max(1, math.ceil(decision.retry_after_s))
        raise Throttled(f"rate limit exceeded; retry after {retry}s", code="rate_limited",
                        details={"retry_after_s": decision.retry_after_s},
                        retry_after_s=retry)


def _unavailable(exc: Exception) -> Unavailable:
    """Fail closed but retryable: no unmetered reads."""
    return Unavailable(f"rate limiter unavailable: {exc}", code="ratelimit_unavailable",
                       retry_after_s=1)
