"""Publishing outputs exactly like built-in indicators: Redis latest value, stream message, history row.

Key scheme (the built-in indicators' shape, with the tenant first so no read path crosses it):
  latest  `signals:{tenant}:{instrument_key}:{timeframe}:custom:{script_id}:{params_hash}`
          a hash with `timestamp` and `payload` (`{"value","timestamp","metadata"}` as JSON)
  stream  `signals:stream:{tenant}:{instrument_key}:{timeframe}` (XADD, capped), fields
          `indicator` (`custom:{script_id}`), `params_hash`, `payload`
Order: history first (idempotent insert), then Redis (one atomic Lua call per output that publishes
only the first time an event is seen), and only then is the event acknowledged upstream. A retry of
the same event therefore leaves one row, one stream message and the newest latest value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis

from customscripts.outputs import OutputRow, OutputStore

STREAM_MAXLEN = 10_000
SEEN_TTL_S = 7 * 24 * 3600

_PUBLISH_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  local current = redis.call('HGET', KEYS[2], 'timestamp')
  if (not current) or tonumber(current) <= tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[2], 'timestamp', ARGV[2], 'payload', ARGV[1])
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
             'indicator', ARGV[4], 'params_hash', ARGV[5], 'payload', ARGV[1])
  return 1
end
return 0
"""


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
        rows = [row for row in rows if row.status == "ok"]
        if not rows:
            return 0
        self.outputs.write_many(rows)
        pipe = self.redis.pipeline(transaction=False)
        for row in rows:
            payload = json.dumps(indicator_payload(row), allow_nan=False, separators=(",", ":"))
            self._publish(
                keys=[_seen_key(row),
                      latest_key(row.tenant, row.instrument_key, row.timeframe, row.script_id, row.params_hash),
                      stream_key(row.tenant, row.instrument_key, row.timeframe)],
                args=[payload, float(row.time), SEEN_TTL_S, f"custom:{row.script_id}", row.params_hash,
                      STREAM_MAXLEN],
                client=pipe,
            )
        return sum(int(x) for x in pipe.execute())

    def latest(self, tenant: str, instrument_key: str, timeframe: str, script_id: str,
               params_hash: str) -> dict | None:
        raw = self.redis.hget(latest_key(tenant, instrument_key, timeframe, script_id, params_hash), "payload")
        return json.loads(raw) if raw else None
