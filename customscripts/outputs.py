"""Script output history (`script_outputs`) and stored one-time results (`onetime_results`).

Only the realtime publisher writes `script_outputs`, through `OutputStore.write_many`: the realtime
publish is the value of record for its event. Its writes commit synchronously (`durable`): the commit
returns only once the rows are on disk, whatever the cluster's `synchronous_commit` default, because
the publisher marks the event done in Redis and the scheduler acknowledges it right after.
The data gateway reads it through `latest`/`history` with its read-only pool; every read is scoped to
one tenant and bounded by an as-of time, so a replay sees what realtime saw; a realtime evaluation's
read of a dependency must cover the series up to its event (`complete`, MissingOutputs). One-time
executes with `store: true` keep their result in `onetime_results` (`OnetimeResults`), keyed by tenant
and call id, which no script ever reads.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from customscripts import ids
from customscripts.errors import Invalid, Malformed
from customscripts.http import parse_json

PARAMS_HASH_LEN = 16
MAX_HISTORY = 5000


def params_hash(params: dict[str, Any] | None) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces), shortened: the same params ⇒ the same key."""
    canonical = json.dumps(params or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:PARAMS_HASH_LEN]


def to_datetime(value: float | int | datetime) -> datetime:
    """Epoch seconds or an aware datetime → aware UTC datetime (naive datetimes are taken as UTC)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"invalid timestamp: {value!r}")
    return datetime.fromtimestamp(value, tz=UTC)


@dataclass(frozen=True)
class OutputRow:
    """One published output: the event identity plus its value (a number, or JSON for dicts)."""

    time: float | datetime
    tenant: str
    instrument_key: str
    timeframe: str
    script_id: str
    version: int
    params_hash: str
    value: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    call_id: str | None = None


_INSERT = """
INSERT INTO script_outputs (time, tenant, instrument_key, timeframe, script_id, version, params_hash,
                            value, value_json, metadata, status, call_id)
SELECT t.time, t.tenant, t.instrument_key, t.timeframe, t.script_id, t.version, t.params_hash,
       t.value, t.value_json::jsonb, t.metadata::jsonb, t.status, t.call_id
FROM unnest(%b::timestamptz[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int[], %b::text[],
            %b::float8[], %b::text[], %b::text[], %b::text[], %b::text[])
     AS t(time, tenant, instrument_key, timeframe, script_id, version, params_hash,
          value, value_json, metadata, status, call_id)
ON CONFLICT ON CONSTRAINT script_outputs_event_key DO NOTHING
"""  # %b: the columns go as binary arrays, about 3x cheaper to encode than text ones (the realtime publish)


def _split_value(value: Any) -> tuple[float | None, str | None]:
    """Numbers go to the float column (fast to read and aggregate); anything else is stored as JSON."""
    if value is None:
        return None, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    return None, json.dumps(value, allow_nan=False)


def _once(memo: dict[tuple, Any], convert: Callable[[Any], Any], value: Any) -> Any:
    """`convert(value)`, remembered in `memo` by the converter, the value's type and the value (so a
    True is never taken for a checked 1); unhashable values are converted (and refused) every time."""
    key = (convert, type(value), value)
    try:
        return memo[key]
    except KeyError:
        memo[key] = converted = convert(value)
        return converted
    except TypeError:
        return convert(value)


@contextmanager
def durable(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """A transaction whose commit returns only once it is on disk (`synchronous_commit = on` for it,
    whatever the cluster or session default): what an acknowledgement is allowed to rely on."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        yield conn


class MissingOutputs(LookupError):
    """A read of a dependency's outputs whose window lacks a bar's output (`bars`, epoch seconds): its
    newest point is older than the series' last bar end as of the read, or a bar in it has no output
    (still being published by another replica, or never). Presented as it is, an older point would
    pass for the current one."""

    def __init__(self, script_id: str, bars: Sequence[float]) -> None:
        shown = ", ".join(datetime.fromtimestamp(t, tz=UTC).isoformat() for t in bars[:3])
        super().__init__(f"dependency {script_id!r} has no output for bar end(s) {shown}"
                         f"{' ...' if len(bars) > 3 else ''}")
        self.script_id = script_id
        self.bars = list(bars)


# The series' bar ends in [lo, hi] (bartime: a bar exists from its end) that have no ok output of the
# script: a window read must cover every one of them between its oldest point and the last bar end.
_MISSING_BARS = """
SELECT extract(epoch FROM c.end_time)::float8 FROM candles c
WHERE c.instrument_key = %s AND c.timeframe = %s AND c.end_time >= %s AND c.end_time <= %s
  AND NOT EXISTS (SELECT 1 FROM script_outputs o
                  WHERE o.tenant = %s AND o.script_id = %s AND o.instrument_key = c.instrument_key
                    AND o.timeframe = c.timeframe AND o.params_hash = %s AND o.time = c.end_time
                    AND o.status = 'ok' AND (%s::int[] IS NULL OR o.version = ANY(%s::int[])))
ORDER BY c.end_time LIMIT 10
"""
_LAST_BAR_END = """
SELECT extract(epoch FROM max(end_time))::float8 FROM candles
WHERE instrument_key = %s AND timeframe = %s AND end_time <= %s
"""


class OutputStore:
    """Batched idempotent writes and tenant-scoped as-of reads of script outputs."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def write_many(self, rows: Iterable[OutputRow]) -> int:
        """Insert rows in one statement, durably (see `durable`); rows already present (same event) are
        skipped, missing ones written again, so a retry restores a row whatever Redis says. Returns
        how many were inserted."""
        cols: list[list[Any]] = [[] for _ in range(12)]
        memo: dict[tuple, Any] = {}  # a batch's rows share most of these: check and convert each once
        for row in rows:
            value, value_json = _split_value(row.value)
            values = (
                _once(memo, to_datetime, row.time), _once(memo, ids.tenant_id, row.tenant),
                _once(memo, ids.instrument_key, row.instrument_key), _once(memo, ids.timeframe, row.timeframe),
                _once(memo, ids.script_id, row.script_id), _once(memo, ids.version, row.version),
                row.params_hash, value, value_json,
                json.dumps(row.metadata, allow_nan=False) if row.metadata else "{}", row.status, row.call_id,
            )
            for col, val in zip(cols, values, strict=True):
                col.append(val)
        if not cols[0]:
            return 0
        with durable(self.pool) as conn:
            return conn.execute(_INSERT, cols).rowcount

    def latest(self, tenant: str, script_id: str, instrument_key: str, timeframe: str, params_hash: str,
               as_of: float | datetime, versions: Sequence[int] | None = None, *,
               complete: bool = False) -> dict[str, Any] | None:
        """The newest output at or before `as_of` (of the given versions, or any), in indicator shape.
        `complete`: it must be the output of the series' last bar end as of then, else MissingOutputs."""
        rows = self._select(tenant, script_id, instrument_key, timeframe, params_hash, versions,
                            start=None, end=as_of, limit=1, newest_first=True)
        if not rows:
            return None
        if complete:
            self._check_complete(tenant, script_id, instrument_key, timeframe, params_hash, versions,
                                 rows[0][0], None, as_of)
        time, version, value, value_json, metadata = rows[0]
        return {"value": value if value is not None else value_json, "timestamp": time,
                "metadata": metadata or {}, "version": version}

    def history(self, tenant: str, script_id: str, instrument_key: str, timeframe: str, params_hash: str,
                *, as_of: float | datetime, start: float | datetime | None = None,
                end: float | datetime | None = None, limit: int = 200,
                versions: Sequence[int] | None = None, complete: bool = False) -> dict[str, list[Any]]:
        """Outputs in time order, columnar; with `start` the first `limit` from it, else the last `limit`.
        `complete`: every bar end of the series from the window's oldest point to its last bar end
        (as of the bound; the newest point when a `start` window is full) must have its output, else
        MissingOutputs: a gap would shift every later point by one bar."""
        limit = max(1, min(int(limit), MAX_HISTORY))
        bound = to_datetime(as_of)
        if end is not None:
            bound = min(bound, to_datetime(end))
        rows = self._select(tenant, script_id, instrument_key, timeframe, params_hash, versions,
                            start=start, end=bound, limit=limit, newest_first=start is None)
        if start is None:
            rows.reverse()
        if complete and rows:
            full = start is not None and len(rows) == limit
            self._check_complete(tenant, script_id, instrument_key, timeframe, params_hash, versions,
                                 rows[-1][0], rows[0][0], rows[-1][0] if full else bound)
        columns: dict[str, list[Any]] = {"time": [], "value": [], "metadata": [], "version": []}
        for time, version, value, value_json, metadata in rows:
            columns["time"].append(time)
            columns["value"].append(value if value is not None else value_json)
            columns["metadata"].append(metadata or {})
            columns["version"].append(version)
        return columns

    def _check_complete(self, tenant: str, script_id: str, instrument_key: str, timeframe: str, params_hash: str,
                        versions: Sequence[int] | None, newest: float, oldest: float | None,
                        bound: float | datetime) -> None:
        """Raise MissingOutputs unless the outputs cover the series' bar ends in [oldest, last bar end
        as of `bound`] (`oldest` None: only that last bar end). The candles say which bar ends exist."""
        with self.pool.connection() as conn:
            last = conn.execute(_LAST_BAR_END, (instrument_key, timeframe, to_datetime(bound))).fetchone()[0]
            if last is None or (oldest is None and newest >= last):
                return
            lo = to_datetime(last if oldest is None else oldest)
            wanted = None if versions is None else list(versions)
            missing = [r[0] for r in conn.execute(_MISSING_BARS, (
                instrument_key, timeframe, lo, to_datetime(last), tenant, script_id, params_hash,
                wanted, wanted)).fetchall()]
        if missing:
            raise MissingOutputs(script_id, missing)

    def _select(self, tenant: str, script_id: str, instrument_key: str, timeframe: str, params_hash: str,
                versions: Sequence[int] | None, *, start: float | datetime | None, end: float | datetime,
                limit: int, newest_first: bool) -> list[tuple[Any, ...]]:
        query = [
            "SELECT extract(epoch FROM time)::float8, version, value, value_json, metadata",
            "FROM script_outputs WHERE tenant = %s AND script_id = %s AND instrument_key = %s",
            "AND timeframe = %s AND params_hash = %s AND status = 'ok' AND time <= %s",
        ]
        args: list[Any] = [tenant, script_id, instrument_key, timeframe, params_hash, to_datetime(end)]
        if versions is not None:
            query.append("AND version = ANY(%s)")
            args.append(list(versions))
        if start is not None:
            query.append("AND time >= %s")
            args.append(to_datetime(start))
        order = "DESC" if newest_first else "ASC"
        query.append(f"ORDER BY time {order}, version DESC LIMIT %s")
        args.append(limit)
        with self.pool.connection() as conn:
            return list(conn.execute(" ".join(query), args).fetchall())


def params_hash_from_query(q: Mapping[str, str]) -> str:
    """`params_hash` as published, or `params` (a JSON object) hashed the same way; default: no params."""
    raw_hash, raw_params = q.get("params_hash"), q.get("params")
    if raw_hash and raw_params:
        raise Malformed("give either params or params_hash, not both", code="invalid_parameter")
    if raw_hash:
        if len(raw_hash) > 64 or not all(c in "0123456789abcdef" for c in raw_hash):
            raise Invalid(f"invalid params_hash: {raw_hash[:80]!r}", code="invalid_parameter")
        return raw_hash
    if raw_params:
        params = parse_json(raw_params, "params")
        if not isinstance(params, dict):
            raise Invalid("params must be a JSON object", code="invalid_parameter")
        try:
            return params_hash(params)
        except ValueError as exc:
            raise Invalid(f"params cannot be hashed: {exc}", code="invalid_parameter") from None
    return params_hash({})


@dataclass(frozen=True)
class OnetimeResult:
    """A one-time execute's ok output, stored because the caller asked (`store: true`)."""

    tenant: str
    call_id: str
    user_id: str
    script_id: str
    version: int
    instrument_key: str
    timeframe: str
    params_hash: str
    as_of: float
    value: Any
    metadata: dict[str, Any] = field(default_factory=dict)


class OnetimeResults:
    """`onetime_results`: written once per (tenant, call id), read only inside the tenant."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def write(self, row: OnetimeResult) -> bool:
        """Insert; False when the tenant already stored a result under this call id (the first stays)."""
        value, value_json = _split_value(row.value)
        with self.pool.connection() as conn:
            cur = conn.execute(
                "INSERT INTO onetime_results (tenant, call_id, user_id, script_id, version, instrument_key,"
                " timeframe, params_hash, as_of, value, value_json, metadata)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)"
                " ON CONFLICT (tenant, call_id) DO NOTHING",
                (ids.tenant_id(row.tenant), ids.call_id(row.call_id), ids.owner_id(row.user_id),
                 ids.script_id(row.script_id), ids.version(row.version), ids.instrument_key(row.instrument_key),
                 ids.timeframe(row.timeframe), row.params_hash, to_datetime(row.as_of), value, value_json,
                 json.dumps(row.metadata or {}, allow_nan=False)))
            return cur.rowcount == 1

    def get(self, tenant: str, call_id: str) -> OnetimeResult | None:
        with self.pool.connection() as conn:
            found = conn.execute(
                "SELECT tenant, call_id, user_id, script_id, version, instrument_key, timeframe, params_hash,"
                " extract(epoch FROM as_of)::float8, value, value_json, metadata FROM onetime_results"
                " WHERE tenant = %s AND call_id = %s", (tenant, call_id)).fetchone()
        if found is None:
            return None
        *head, value, value_json, metadata = found
        return OnetimeResult(*head, value=value if value is not None else value_json, metadata=metadata or {})
