"""The Data Access Gateway's HTTP API (served by gateway-fn): read-only, token-scoped, as-of bounded.

Every data route: verify the execution token (401) → rate-limit the user and the script (429) →
validate parameters (400/422) → read with the read-only database role, never past the token's as-of
time (a bar exists from its end, `end_time`; metrics and outputs from their `time`: bartime.py)
and, for script outputs, only in the token's tenant and dependency closure (403). The rate
limiter's Redis round trip overlaps the read (`GatewayApi._metered`).
Responses are columnar JSON (`{"columns": {"time": [...], "close": [...]}}`) so a reader turns them
into numpy arrays with one `np.asarray` per column. Market and metric reads sent with
`Accept: application/vnd.customscripts.columns` get the same head with the columns as native float64
(`customscripts.sandbox.protocol.columns_payload`): the sandbox supervisor hands them to the script's
numpy arrays without parsing 1,200 floats from JSON (~0.2 ms per read).
"""

from __future__ import annotations

import functools
import http.client
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool
import redis

from customscripts import db, ids, metrics
from customscripts.config import Settings, settings
from customscripts.errors import (
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Unavailable,
    UpstreamFailed,
)
from customscripts.gateway.ratelimit import Decision, RateLimiter, raise_if_refused
from customscripts.gateway.tokens import ExecutionClaims, verify_execution_token
from customscripts.http import (
    Context,
    Event,
    KeepAlivePool,
    Request,
    Response,
    RouteHandler,
    Router,
    json_response,
    python3_http_result,
)
from customscripts.inputs import check_query, int_param, required_param, time_param
from customscripts.outputs import MAX_HISTORY, MissingOutputs, OutputStore, params_hash_from_query
from customscripts.sandbox.prefetch import MAX_TIME_ABS  # the range the prefetch answers for too
from customscripts.sandbox.protocol import COLUMNS_MEDIA_TYPE, binary_payload, pack_columns

DEFAULT_LIMIT = 200
# A read waits at most this long for a database connection: when the database is down or restarting the
# caller gets a quick 503, which its client retries and the scheduler treats as an outage, instead of a
# read that outlasts the execution's time.
DB_WAIT_S = 1.0
MAX_LIMIT = MAX_HISTORY
# `time` is the bar's start, `end_time` its end: the bar is visible as of T only when end_time <= T
CANDLE_COLUMNS = ("time", "end_time", "open", "high", "low", "close", "volume")
_TIME_COLUMNS = frozenset({"time", "end_time"})

_SERIES_PARAMS = {"limit", "start", "end"}
# Market windows kept per gateway process (the encoded columns of one read each); cleared when full.
WINDOW_CACHE_SIZE = 2048
CANDLES_CHANNEL = "cs_candles"  # migrations/006_candles_notify.sql
SETTLED_S = 60.0  # market windows ending later than this before now are always proven by a count
REFUSED_CALLERS = 10_000  # callers remembered as over their limit (checked before any work); cleared when full


@dataclass
class _Window:
    """One market read, with what is needed to prove it is still exact, and its encodings (made on
    first use: a window is answered as JSON text or as native float64 columns).

    Candles are insert-only (the loader inserts with ON CONFLICT DO NOTHING; nothing updates or
    deletes them), so a window changes only if a row is inserted inside the interval of bar ends it
    was read from: [its oldest row, end] for the latest-N read, [start, its newest row] for a read from
    `start` (up to `end` when it came back short of `limit`). `count(*)` over that interval equal to
    the window's row count proves nothing was; one index-only count (~0.15 ms) replaces the window
    query and its encoding (~0.7 ms). Windows that ended more than SETTLED_S ago skip even the count
    while the candle feed (db.ChangeFeed on cs_candles, migration 006) is live and has announced no
    change to their series since they were proven: a backfill then shows as soon as its notification
    arrives (well under a millisecond), and reads near "now", where realtime evaluations happen,
    always count.
    """

    columns: dict[str, list[Any]]
    rows: int
    lo: datetime | None
    hi: datetime
    stamp: tuple[int, int]  # the candle feed's (epoch, series generation) when last proven exact
    _json: str | None = None
    _f64: tuple[list[list[Any]], bytes] | None = None

    def json_text(self) -> str:
        if self._json is None:
            self._json = json.dumps(self.columns, separators=(",", ":"), allow_nan=False)
        return self._json

    def f64(self) -> tuple[list[list[Any]], bytes]:
        """The "f64" spec and the packed columns (None values become NaN)."""
        if self._f64 is None:
            self._f64 = _pack(self.columns)
        return self._f64


def _pack(columns: dict[str, list[Any]]) -> tuple[list[list[Any]], bytes]:
    """The float8 columns the store returned (None values are NaN), packed for a columns reply."""
    packed = pack_columns(columns)
    if packed is None:  # the store's float8 arrays are always numeric
        raise DomainError("market data store returned non-numeric columns")
    return packed


def _wants_columns(req: Request) -> bool:
    """The caller asked for native float64 columns (the sandbox supervisor does)."""
    return COLUMNS_MEDIA_TYPE in (req.header("Accept") or "")


def _columns_response(head: dict[str, Any], spec: list[list[Any]], blob: bytes) -> Response:
    """A columns payload (`protocol.columns_payload` layout) as a bytes body: see `python3_http_result`."""
    return {"statusCode": 200, "body": binary_payload({**head, "f64": spec}, blob),
            "headers": {"Content-Type": COLUMNS_MEDIA_TYPE}}


def _body(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Pre-serialised compact JSON: cheaper than the framework's encoder on the hot path."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return {"statusCode": status, "body": text,
            "headers": {"Content-Type": "application/json", **(headers or {})}}


def _window(query: Mapping[str, str], claims: ExecutionClaims) -> tuple[float | None, float, int]:
    """(start, end, limit) with end clamped to the token's as-of time: nothing newer is ever read."""
    start, end = time_param(query, "start", low=-MAX_TIME_ABS, high=MAX_TIME_ABS), \
        time_param(query, "end", low=-MAX_TIME_ABS, high=MAX_TIME_ABS)
    limit = int_param(query, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
    end = claims.as_of if end is None else min(end, claims.as_of)
    if start is not None and start > end:
        raise Invalid("start is after end (or after the execution's as-of time)", code="invalid_window")
    return start, end, limit


def _epoch_sql(column: str) -> str:
    """A column as the float8 the answer carries (timestamps as epoch seconds)."""
    return f"extract(epoch FROM {column})::float8" if column in _TIME_COLUMNS else column


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


FORWARDED = ("Authorization", "X-Function-Proof", "Content-Type")  # to the registry, for function URLs


class GatewayApi:
    """Routes plus what they need (config, read-only pool, rate limiter); one per process."""

    def __init__(self, cfg: Settings | None = None, *, pool: psycopg_pool.ConnectionPool | None = None,
                 limiter: RateLimiter | None = None) -> None:
        self.cfg = cfg or settings()
        self._pool = pool
        self.limiter = limiter or RateLimiter(self.cfg)
        self._windows: dict[tuple[str, str, float | None, float, int], _Window] = {}
        self._series_gen: dict[tuple[str, str], int] = {}  # candle changes announced per series
        self._epoch = 0  # bumped whenever the candle feed (re)connects or drops
        self.candle_feed = db.ChangeFeed(self.cfg.pg_reader_dsn, CANDLES_CHANNEL, self._candles_changed,
                                         self._candles_reset)
        self._refused: dict[tuple[str, str, str, bool], float] = {}  # caller -> refused until (monotonic)
        self.router = Router()
        r = self.router
        r.route("GET", "/healthz")(self.healthz)
        r.route("GET", "/data/market")(self._metered(self.market))
        r.route("GET", "/data/metrics")(self._metered(self.metrics))
        r.route("GET", "/data/scripts/{script_id}/latest")(self._metered(self.script_latest))
        r.route("GET", "/data/scripts/{script_id}/history")(self._metered(self.script_history))
        r.route("POST", "/functions/{function}/authorise")(self.function_call)
        r.route("POST", "/functions/{function}/complete")(self.function_call)
        self._registry: tuple[KeepAlivePool, str] | None = None

    def function_call(self, req: Request) -> Response:
        """A script function's way to the registry for a user's call on its function URL (script
        functions reach nothing but gateway-fn): forwarded as is; the registry checks the function's
        proof and the user's token (registry/api.py `/functions/...`)."""
        if self._registry is None:
            self._registry = KeepAlivePool.for_url(self.cfg.registry_service_url, maxsize=16)
        pool, prefix = self._registry
        headers = {k: v for k in FORWARDED if (v := req.header(k))}
        headers["X-Call-Id"] = req.call_id
        path = req.event.path.split("?", 1)[0]
        try:
            reply = pool.request("POST", prefix + path, req.event.body or b"", headers, timeout=(2.0, 30.0))
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"registry unreachable: {type(exc).__name__}", code="registry_unavailable",
                              retry_after_s=1) from None
        try:
            body = reply.json()
        except ValueError:
            raise UpstreamFailed(f"registry answered {reply.status} without JSON", code="registry_error") from None
        return json_response(body, reply.status, {k: v for k, v in reply.headers.items() if k.lower() == "retry-after"})

    @property
    def pool(self) -> psycopg_pool.ConnectionPool:
        if self._pool is None:
            self._pool = db.pool(self.cfg.pg_reader_dsn)
        return self._pool

    def handle(self, event: Event, context: Context | None = None) -> Any:
        """python3-http `handle`: columns replies come back as the (bytes, status, headers) tuple."""
        return python3_http_result(self.router.dispatch(event))

    # ------------------------------------------------------------------ plumbing

    def _metered(self, route: Callable[[Request, ExecutionClaims], Response]) -> RouteHandler:
        """A data route behind the execution token (401) and the rate limiter (429).

        The limiter's Redis round trip overlaps the route's own work (its query): the check is sent
        first and its answer read when the route is done, and a refusal is answered before anything
        the route produced or raised, as if it had been checked first. A caller refused within its
        Retry-After is checked before any work, so callers over their limit cost no queries."""

        def handler(req: Request) -> Response:
            claims = self._verify(req)
            caller = (claims.tenant, claims.user, claims.script_id, claims.realtime)
            meter = {"tenant": claims.tenant, "user": claims.user, "script_id": claims.script_id,
                     "tier_name": claims.tier, "realtime": claims.realtime}
            if self._refused.get(caller, 0.0) > time.monotonic():
                self._settle(caller, self.limiter.check(**meter))  # type: ignore[arg-type]
                return route(req, claims)
            pending = self.limiter.begin(**meter)  # type: ignore[arg-type]
            try:
                response = route(req, claims)
            except BaseException:
                self._settle(caller, pending.decision())
                raise
            self._settle(caller, pending.decision())
            return response

        return handler

    def _settle(self, caller: tuple[str, str, str, bool], decision: Decision) -> None:
        if decision.allowed:
            self._refused.pop(caller, None)
            return
        if len(self._refused) >= REFUSED_CALLERS:
            self._refused.clear()
        self._refused[caller] = time.monotonic() + max(decision.retry_after_s, 0.001)
        metrics.GATEWAY_RATE_LIMITED.labels("realtime" if caller[3] else "onetime").inc()
        raise_if_refused(decision)

    def _verify(self, req: Request) -> ExecutionClaims:
        header = req.header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        claims = verify_execution_token(token.strip() if scheme.lower() == "bearer" else None, self.cfg)
        if self.cfg.tier(claims.tier) is None:
            raise Forbidden(f"unknown tier {claims.tier!r}", code="unknown_tier")
        return claims

    def _query(self, sql: str, args: list[Any], binary: bool = False) -> list[tuple[Any, ...]]:
        try:
            with self.pool.connection(timeout=DB_WAIT_S) as conn:
                return list(conn.cursor(binary=binary).execute(sql, args).fetchall())
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise Unavailable(f"market data store unavailable: {exc}", code="store_unavailable",
                              retry_after_s=1) from None

    def _series(self, table: str, key_sql: str, key_args: list[Any], columns: tuple[str, ...],
                start: float | None, end: float, limit: int, known_at: str = "time") -> dict[str, list[Any]]:
        """One round trip: the window's rows aggregated into one array per column, in time order."""
        return self._series_bounds(table, key_sql, key_args, columns, start, end, limit, known_at)[0]

    def _series_bounds(self, table: str, key_sql: str, key_args: list[Any], columns: tuple[str, ...],
                       start: float | None, end: float, limit: int, known_at: str = "time"
                       ) -> tuple[dict[str, list[Any]], datetime | None, datetime | None]:
        """`_series` plus the window's exact oldest and newest `known_at` (None when it is empty).

        `known_at` is the column that says when a row exists: `end_time` for candles (a bar is
        visible at its end, customscripts/bartime.py), `time` for metrics and outputs (stamped when
        they became known). `start`/`end` bound it, so `end` (the as-of) never lets a row in early."""
        inner_order = "ASC" if start is not None else "DESC"
        where = f"{key_sql} AND {known_at} <= %s" + (f" AND {known_at} >= %s" if start is not None else "")
        args = [*key_args, _ts(end)] + ([_ts(start)] if start is not None else []) + [limit]
        values = ", ".join(dict.fromkeys((*columns, known_at)))
        aggs = ", ".join(f"array_agg({_epoch_sql(c)} ORDER BY {known_at})" for c in columns)
        sql = (f"SELECT {aggs}, min({known_at}), max({known_at}) "
               f"FROM (SELECT {values} FROM {table} WHERE {where} "
               f"ORDER BY {known_at} {inner_order} LIMIT %s) w")
        row = self._query(sql, args, binary=True)[0]  # binary float8 arrays: ~2x faster than text
        data = {name: list(col or []) for name, col in zip(columns, row[:len(columns)], strict=True)}
        return data, row[-2], row[-1]

    def _market_window(self, instrument: str, timeframe: str, start: float | None, end: float,
                       limit: int) -> _Window:
        """The market window, from the cache when a count proves it unchanged."""
        key = (instrument, timeframe, start, end, limit)
        self.candle_feed.start()
        stamp = (self._epoch, self._series_gen.get((instrument, timeframe), 0))  # before any query
        cached = self._windows.get(key)
        if cached is not None:
            if (cached.stamp == stamp and self.candle_feed.live
                    and cached.hi.timestamp() < time.time() - SETTLED_S):
                return cached
            where = "instrument_key = %s AND timeframe = %s AND end_time <= %s"
            args: list[Any] = [instrument, timeframe, cached.hi]
            if cached.lo is not None:
                where += " AND end_time >= %s"
                args.append(cached.lo)
            if self._query(f"SELECT count(*) FROM candles WHERE {where}", args, binary=True)[0][0] == cached.rows:
                cached.stamp = stamp
                return cached
        columns, oldest, newest = self._series_bounds(
            "candles", "instrument_key = %s AND timeframe = %s", [instrument, timeframe], CANDLE_COLUMNS,
            start, end, limit, known_at="end_time")
        rows = len(columns["time"])
        full = rows == limit and oldest is not None and newest is not None
        if start is None:  # the latest `limit` rows at or before end
            lo, hi = (oldest if full else None), _ts(end)
        else:  # the first `limit` rows from start
            lo, hi = _ts(start), (newest if full else _ts(end))
        if len(self._windows) >= WINDOW_CACHE_SIZE:
            self._windows.clear()
        window = self._windows[key] = _Window(columns, rows, lo, hi, stamp)
        return window

    def _candles_changed(self, payload: str) -> None:
        series = tuple(payload.split("|", 1))
        self._series_gen[series] = self._series_gen.get(series, 0) + 1  # type: ignore[index]

    def _candles_reset(self) -> None:
        self._epoch += 1

    # ------------------------------------------------------------------ routes

    def healthz(self, req: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            self._query("SELECT 1", [])
            checks["database"] = "ok"
        except DomainError as exc:
            checks["database"] = exc.message
        try:
            self.limiter.redis.ping()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = str(exc)
        healthy = all(v == "ok" for v in checks.values())
        return _body({"status": "ok" if healthy else "degraded", "checks": checks}, 200 if healthy else 503)

    def market(self, req: Request, claims: ExecutionClaims) -> Response:
        q = req.query
        check_query(q, {"instrument_key", "timeframe"} | _SERIES_PARAMS)
        instrument = ids.instrument_key(required_param(q, "instrument_key"))
        timeframe = ids.timeframe(required_param(q, "timeframe"))
        start, end, limit = _window(q, claims)
        window = self._market_window(instrument, timeframe, start, end, limit)
        head = {"instrument_key": instrument, "timeframe": timeframe, "as_of": claims.as_of}
        if _wants_columns(req):
            return _columns_response(head, *window.f64())
        text = json.dumps(head, separators=(",", ":"), allow_nan=False)
        # byte-for-byte what _body() would encode for the same dict with "columns" last
        text = f'{text[:-1]},"columns":{window.json_text()}}}'
        return {"statusCode": 200, "body": text, "headers": {"Content-Type": "application/json"}}

    def metrics(self, req: Request, claims: ExecutionClaims) -> Response:
        q = req.query
        check_query(q, {"instrument_key", "name"} | _SERIES_PARAMS)
        instrument = ids.instrument_key(required_param(q, "instrument_key"))
        name = _metric_name(required_param(q, "name"))
        start, end, limit = _window(q, claims)
        columns = self._series("metrics", "instrument_key = %s AND name = %s", [instrument, name],
                               ("time", "value"), start, end, limit)
        head = {"instrument_key": instrument, "name": name, "as_of": claims.as_of}
        if _wants_columns(req):
            return _columns_response(head, *_pack(columns))
        return _body({**head, "columns": columns})

    def _script_scope(self, req: Request, claims: ExecutionClaims) -> tuple[str, list[int] | None]:
        script_id = ids.script_id(req.params["script_id"])
        try:
            versions = claims.readable_versions(script_id)
        except LookupError:
            raise Forbidden(f"script {script_id!r} is not in this execution's dependency closure",
                            code="not_a_dependency") from None
        return script_id, versions

    def _output_key(self, q: Mapping[str, str]) -> tuple[str, str, str]:
        instrument = ids.instrument_key(required_param(q, "instrument_key"))
        timeframe = ids.timeframe(required_param(q, "timeframe"))
        return instrument, timeframe, params_hash_from_query(q)

    @staticmethod
    def _complete(claims: ExecutionClaims, script_id: str) -> bool:
        """Whether a read of `script_id`'s outputs must cover its series up to the as-of bar: a realtime
        evaluation (the scheduler's token: the event's time) reading another script, its dependency.
        Never an older point presented as the current one (customscripts/outputs.py MissingOutputs)."""
        return claims.realtime and script_id != claims.script_id

    @staticmethod
    def _missing(exc: MissingOutputs) -> NotFound:
        """`no_output`: the execution fails with `dependency_failed` naming the dependency."""
        return NotFound(str(exc), code="no_output",
                        details={"script_id": exc.script_id, "missing_bar_ends": exc.bars})

    def script_latest(self, req: Request, claims: ExecutionClaims) -> Response:
        script_id, versions = self._script_scope(req, claims)
        q = req.query
        check_query(q, {"instrument_key", "timeframe", "params", "params_hash"})
        instrument, timeframe, phash = self._output_key(q)
        store = OutputStore(self.pool)
        try:
            latest = store.latest(claims.tenant, script_id, instrument, timeframe, phash, claims.as_of,
                                  versions, complete=self._complete(claims, script_id))
        except MissingOutputs as exc:
            raise self._missing(exc) from None
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise Unavailable(f"output store unavailable: {exc}", code="store_unavailable",
                              retry_after_s=1) from None
        if latest is None:
            raise NotFound(f"no output of script {script_id!r} for {instrument} {timeframe} "
                           f"(params_hash {phash}) at or before the execution's as-of time",
                           code="no_output", details={"script_id": script_id})
        return _body({"script_id": script_id, "instrument_key": instrument, "timeframe": timeframe,
                      "params_hash": phash, **latest})

    def script_history(self, req: Request, claims: ExecutionClaims) -> Response:
        script_id, versions = self._script_scope(req, claims)
        q = req.query
        check_query(q, {"instrument_key", "timeframe", "params", "params_hash"} | _SERIES_PARAMS)
        instrument, timeframe, phash = self._output_key(q)
        start, end, limit = _window(q, claims)
        store = OutputStore(self.pool)
        try:
            columns = store.history(claims.tenant, script_id, instrument, timeframe, phash, as_of=end,
                                    start=start, limit=limit, versions=versions,
                                    complete=self._complete(claims, script_id))
        except MissingOutputs as exc:
            raise self._missing(exc) from None
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise Unavailable(f"output store unavailable: {exc}", code="store_unavailable",
                              retry_after_s=1) from None
        return _body({"script_id": script_id, "instrument_key": instrument, "timeframe": timeframe,
                      "params_hash": phash, "as_of": claims.as_of, "columns": columns})


def _metric_name(value: str) -> str:
    ok = 0 < len(value) <= 128 and value.isascii() and all(c.isalnum() or c in "._-:" for c in value)
    if not ok:
        raise Invalid(f"invalid metric name: {value[:80]!r}", code="invalid_metric_name")
    return value


@functools.cache
def default_api() -> GatewayApi:
    return GatewayApi()


def handle(event: Event, context: Context | None = None) -> Any:
    """python3-http entry point (gateway-fn/handler.py delegates here)."""
    return default_api().handle(event, context)
