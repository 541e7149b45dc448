"""Publishing outputs exactly like built-in indicators: Redis latest value, stream message, history row.

Key scheme (the built-in indicators' shape, with the tenant first so no read path crosses it):
  latest  `signals:{tenant}:{instrument_key}:{timeframe}:custom:{script_id}:{params_hash}`
          a hash with `timestamp` and `payload` (`{"value","timestamp","metadata"}` as JSON)
  stream  `signals:stream:{tenant}:{instrument_key}:{timeframe}` (XADD, capped), fields
          `indicator` (`custom:{script_id}`), `params_hash`, `payload`
Order: history first (idempotent insert, committed synchronously: on disk before the commit returns,
whatever the cluster's default), then Redis (a Lua script that publishes each output only the first
time its event is seen - one call per REDIS_CHUNK outputs, so a wave of thousands costs a few round
trips and no per-command client overhead), and only then is the event acknowledged upstream.
A retry of the same event therefore leaves one row, one stream message and the newest latest value.

Acknowledged => durable. The `seen` marker is set only after the rows' commit returned, so it never
covers a row that is not on disk; a retry writes the rows first whatever Redis says (a row that is
missing is inserted again, one that exists is left), then skips the stream message of what was seen.
A retry after the rows committed but before Redis ran publishes the Redis part then. Dead letters
commit the same way before their events are acknowledged.

Dead letters: an evaluation the platform could not complete after its bounded retries is recorded in
`realtime_dead_letters` (migration 008) instead of being published, before its events are
acknowledged; one row per evaluation, so a redelivered event leaves no second row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import redis

from customscripts.outputs import OutputRow, OutputStore, durable, to_datetime
from customscripts.text import storable

STREAM_MAXLEN = 10_000
SEEN_TTL_S = 7 * 24 * 3600
REDIS_CHUNK = 500  # outputs per Lua call: Redis stays responsive (a few ms per call)

# KEYS: (seen, latest, stream) per output. ARGV: ttl, maxlen, then (payload, time, indicator,
# params_hash) per output. Returns how many outputs were new.
_PUBLISH_LUA = """
local ttl, maxlen, new = ARGV[1], ARGV[2], 0
for i = 0, #KEYS / 3 - 1 do
  local k, a = 3 * i, 2 + 4 * i
  if redis.call('SET', KEYS[k + 1], '1', 'NX', 'EX', ttl) then
    local current = redis.call('HGET', KEYS[k + 2], 'timestamp')
    if (not current) or tonumber(current) <= tonumber(ARGV[a + 2]) then
      redis.call('HSET', KEYS[k + 2], 'timestamp', ARGV[a + 2], 'payload', ARGV[a + 1])
    end
    redis.call('XADD', KEYS[k + 3], 'MAXLEN', '~', maxlen, '*',
               'indicator', ARGV[a + 3], 'params_hash', ARGV[a + 4], 'payload', ARGV[a + 1])
    new = new + 1
  end
end
return new
"""


_PAYLOAD_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))  # built once, not per output

_DEAD_LETTER_SQL = """
INSERT INTO realtime_dead_letters (tenant, user_id, script_id, version, params_hash, instrument_key, timeframe,
                                   event_time, reason, error, attempts, call_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT ON CONSTRAINT realtime_dead_letters_evaluation DO UPDATE
SET at = now(), user_id = EXCLUDED.user_id, reason = EXCLUDED.reason, error = EXCLUDED.error,
    attempts = realtime_dead_letters.attempts + EXCLUDED.attempts, call_id = EXCLUDED.call_id
"""


class DeadLetter(NamedTuple):
    """One realtime evaluation given up on: what it was, for whom, why, after how many attempts."""

    tenant: str
    user_id: str
    script_id: str
    version: int
    params_hash: str
    instrument_key: str
    timeframe: str
    time: float
    reason: str
    error: str
    attempts: int
    call_id: str


def latest_key(tenant: str, instrument_key: str, timeframe: str, script_id: str, params_hash: str) -> str:
    return f"signals:{tenant}:{instrument_key}:{timeframe}:custom:{script_id}:{params_hash}"


def stream_key(tenant: str, instrument_key: str, timeframe: str) -> str:
    return f"signals:stream:{tenant}:{instrument_key}:{timeframe}"


def _seen_key(row: OutputRow) -> str:
    return (f"signals:seen:{row.tenant}:{row.script_id}:{row.version}:{row.instrument_key}:"
            f"{row.timeframe}:{row.params_hash}:{float(row.time):.3f}")


def indicator_payload(row: OutputRow) -> dict:
    return {"value": row.value, "timestamp": float(row.time), "metadata": row.metadata or {}}


class Publisher:
    def __init__(self, redis_client: redis.Redis, outputs: OutputStore) -> None:
        self.redis = redis_client
        self.outputs = outputs
        self._publish = redis_client.register_script(_PUBLISH_LUA)

    def publish(self, rows: Sequence[OutputRow]) -> int:
        """Publish a batch of ok outputs; returns how many were new on the stream."""
        return self.publish_rows(rows)[0]

    def publish_rows(self, rows: Sequence[OutputRow]) -> tuple[int, int]:
        """Publish a batch of ok outputs; returns (new on the stream, new history rows). The second
        tells the scheduler whether every row it holds is the one the gateway would now read."""
        rows = [row for row in rows if row.status == "ok"]
        if not rows:
            return 0, 0
        inserted = self.outputs.write_many(rows)
        pipe = self.redis.pipeline(transaction=False)
        for i in range(0, len(rows), REDIS_CHUNK):
            keys: list[str] = []
            args: list[str | float | int] = [SEEN_TTL_S, STREAM_MAXLEN]
            for row in rows[i:i + REDIS_CHUNK]:
                payload = _PAYLOAD_JSON.encode(indicator_payload(row))
                keys += (_seen_key(row),
                         latest_key(row.tenant, row.instrument_key, row.timeframe, row.script_id, row.params_hash),
                         stream_key(row.tenant, row.instrument_key, row.timeframe))
                args += (payload, float(row.time), f"custom:{row.script_id}", row.params_hash)
            self._publish(keys=keys, args=args, client=pipe)
        return sum(int(x) for x in pipe.execute()), inserted

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Record evaluations given up on (idempotent per evaluation); raises if PostgreSQL fails, so
        their events stay unacknowledged rather than vanish unrecorded."""
        if not letters:
            return
        with durable(self.outputs.pool) as conn, conn.cursor() as cur:
            cur.executemany(_DEAD_LETTER_SQL, [(*d[:7], to_datetime(d.time), d.reason, storable(d.error), *d[10:])
                                             for d in letters])

    def latest(self, tenant: str, instrument_key: str, timeframe: str, script_id: str,
               params_hash: str) -> dict | None:
        raw = self.redis.hget(latest_key(tenant, instrument_key, timeframe, script_id, params_hash), "payload")
        return json.loads(raw) if raw else None
