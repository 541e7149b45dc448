"""GatewayClient: how the sandbox supervisor answers a script's read calls (the `DataSource` protocol).

Connections are pooled keep-alive `http.client` connections shared by every client in the process
for the same gateway (`KeepAlivePool`, ~0.05 ms per call against ~0.45 ms through requests); the
execution token is sent per call and never stored in shared state, so clients for different
executions share the pool safely across threads. Transient failures (connection errors, timeouts,
502/503/504, 429) are retried a bounded number of times with exponential backoff and jitter, a 429
waiting for its Retry-After (capped); after that the call fails naming the gateway URL and the call:
with DataSourceUnavailable (retryable: an outage) unless the last refusal was the caller's own rate
limit (DataAccessError: the script's quota). The token stays here, in the trusted supervisor, and
never reaches the child.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import requests

from customscripts.http import Headers, KeepAlivePool, RawReply
from customscripts.retry import RetryPolicy
from customscripts.sandbox.datasource import (
    DataAccessError,
    DataDenied,
    DataSourceUnavailable,
    DeadlineExceeded,
    DependencyNotPublished,
    DependencyUnavailable,
    read_deadline,
)
from customscripts.sandbox.protocol import COLUMNS_MEDIA_TYPE, columns_payload

TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
TRANSIENT_RETRY = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=1.0)


class DataRequestError(DataAccessError, ValueError):
    """The gateway rejected the call's arguments (400/422): the script's mistake, not an outage."""


_pools: dict[str, tuple[KeepAlivePool, str]] = {}
_pools_lock = threading.Lock()


def shared_pool(base_url: str) -> tuple[KeepAlivePool, str]:
    """The process-wide keep-alive pool for one gateway URL, and the URL's path prefix."""
    with _pools_lock:
        if base_url not in _pools:
            _pools[base_url] = KeepAlivePool.for_url(base_url, maxsize=16)
        return _pools[base_url]


def _retry_after(response: RawReply) -> float | None:
    raw = response.headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _error_message(response: RawReply) -> str:
    try:
        error = response.json().get("error", {})
        return f"{response.status} {error.get('code', '')}: {error.get('message', '')}".strip()
    except (ValueError, AttributeError):
        return f"{response.status} {response.text[:200]}"


class GatewayClient:
    """Data client for one execution: `get_market_data`, `get_metric`, `get_script_output`."""

    def __init__(self, base_url: str, token: str, *, retry: RetryPolicy = TRANSIENT_RETRY,
                 retry_after_cap_s: float = 5.0,
                 timeout: tuple[float, float] = (1.0, 10.0), session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.retry_after_cap_s = retry_after_cap_s
        self.timeout = timeout
        self.sleep = sleep
        self.requests_sent = 0  # every HTTP attempt, retries included (observability, tests)
        self.retries = 0
        self._auth = {"Authorization": f"Bearer {token}"}  # sent per call: nothing shared holds a token
        self._auth_columns = {**self._auth, "Accept": COLUMNS_MEDIA_TYPE}
        self.session = session
        self._pool: KeepAlivePool | None = None
        self._prefix = ""
        if session is not None:
            # Deprecated: callers that still make a Session per token read it back from there. The
            # header sent is always the per-call one, so even a shared session reads correctly.
            session.headers["Authorization"] = self._auth["Authorization"]
        elif self.base_url.startswith(("http://", "http+unix://")):
            self._pool, self._prefix = shared_pool(self.base_url)
        else:  # https: through requests (the pool speaks plain http, the in-cluster hop)
            self.session = requests.Session()

    def close(self) -> None:
        """Connections belong to the shared pool (or the caller's session): nothing to release."""

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ DataSource

    def get_market_data(self, instrument_key: str, timeframe: str, *, limit: int | None = None,
                        start: float | None = None, end: float | None = None) -> dict:
        params = {"instrument_key": instrument_key, "timeframe": timeframe,
                  **_window(limit, start, end)}
        return self._get(f"get_market_data({instrument_key!r}, {timeframe!r})", "/data/market", params)

    def get_metric(self, instrument_key: str, name: str, *, limit: int | None = None,
                   start: float | None = None, end: float | None = None) -> dict:
        params = {"instrument_key": instrument_key, "name": name, **_window(limit, start, end)}
        return self._get(f"get_metric({instrument_key!r}, {name!r})", "/data/metrics", params)

    def market_columns(self, instrument_key: str, timeframe: str, *, limit: int | None = None,
                       start: float | None = None, end: float | None = None) -> bytes:
        """get_market_data as a columns payload (`ColumnFrames`): no number is parsed on the way."""
        params = {"instrument_key": instrument_key, "timeframe": timeframe, **_window(limit, start, end)}
        return self._columns(f"get_market_data({instrument_key!r}, {timeframe!r})", "/data/market", params)

    def metric_columns(self, instrument_key: str, name: str, *, limit: int | None = None,
                       start: float | None = None, end: float | None = None) -> bytes:
        """get_metric as a columns payload (`ColumnFrames`)."""
        params = {"instrument_key": instrument_key, "name": name, **_window(limit, start, end)}
        return self._columns(f"get_metric({instrument_key!r}, {name!r})", "/data/metrics", params)

    def get_script_output(self, script_id: str, instrument_key: str, timeframe: str, *,
                          params: dict | None = None, history: int | None = None) -> dict:
        """Latest output in indicator shape, or with `history=n` the last n outputs (columnar)."""
        query: dict[str, Any] = {"instrument_key": instrument_key, "timeframe": timeframe}
        if params:
            query["params"] = json.dumps(params, sort_keys=True, separators=(",", ":"))
        call = f"get_script_output({script_id!r}, {instrument_key!r}, {timeframe!r})"
        if history is not None:
            query["limit"] = int(history)
            result = self._get(call, f"/data/scripts/{script_id}/history", query, script_id=script_id)
            if not result["columns"]["time"]:
                raise DependencyUnavailable(script_id)
            return result
        result = self._get(call, f"/data/scripts/{script_id}/latest", query, script_id=script_id)
        return {"value": result["value"], "timestamp": result["timestamp"], "metadata": result["metadata"]}

    # ------------------------------------------------------------------ transport

    def _send(self, path: str, params: dict[str, Any], headers: dict[str, str],
              timeout: tuple[float, float]) -> RawReply:
        """One GET; connection failures and timeouts raise OSError/HTTPException (retried by _fetch)."""
        if self._pool is not None:
            target = f"{self._prefix}{path}?{urlencode(params)}" if params else self._prefix + path
            return self._pool.request("GET", target, headers=headers, timeout=timeout)
        assert self.session is not None
        try:
            resp = self.session.get(self.base_url + path, params=params, headers=headers, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        return RawReply(resp.status_code, Headers(list(resp.headers.items())), resp.content)

    def _get(self, call: str, path: str, params: dict[str, Any], *, script_id: str | None = None) -> dict:
        response = self._fetch(call, path, params, self._auth, script_id)
        try:
            return response.json()
        except ValueError:
            raise DataAccessError(f"data gateway at {self.base_url} returned invalid JSON for {call}") from None

    def _columns(self, call: str, path: str, params: dict[str, Any]) -> bytes:
        """A series read as a columns payload; a gateway that answers JSON is converted here."""
        response = self._fetch(call, path, params, self._auth_columns, None)
        if (response.headers.get("Content-Type") or "").startswith(COLUMNS_MEDIA_TYPE):
            return response.body
        try:
            payload = response.json()
        except ValueError:
            payload = None
        body = None
        if isinstance(payload, dict) and isinstance(payload.get("columns"), dict):
            body = columns_payload({k: v for k, v in payload.items() if k != "columns"}, payload["columns"])
        if body is None:
            raise DataAccessError(f"data gateway at {self.base_url} returned an invalid reply for {call}")
        return body

    def _fetch(self, call: str, path: str, params: dict[str, Any], headers: dict[str, str],
               script_id: str | None) -> RawReply:
        """The 200 reply, after bounded retries of transient failures; other statuses raise. Within the
        execution's `read_deadline`, if one is set: attempts and pauses never outlast it."""
        last = "no attempt made"
        limited = False
        down = False  # the gateway said it cannot serve (502-504) or refused the connection: an outage
        deadline = read_deadline.get()
        for attempt in range(1, self.retry.attempts + 1):
            wait: float | None = None
            limited = False
            timeout = self.timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._out_of_time(call, last, down)
                timeout = (min(self.timeout[0], left), min(self.timeout[1], left))
            self.requests_sent += 1
            try:
                response = self._send(path, params, headers, timeout)
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
                down = down or not isinstance(exc, TimeoutError)  # a slow answer may be the read's own doing
            else:
                status = response.status
                if status == 200:
                    return response
                if status not in TRANSIENT_STATUS:
                    self._raise_final(call, response, script_id)
                last = _error_message(response)
                limited = status == 429
                down = down or status != 429
                if status == 429 or status == 503:
                    after = _retry_after(response)
                    if after is not None:
                        wait = min(after, self.retry_after_cap_s)
            if not self.retry.gives_up(attempt):
                pause = wait if wait is not None else self.retry.pause(attempt)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise self._out_of_time(call, last, down)
                self.retries += 1
                self.sleep(pause)
        # refused for the caller's own rate limit: the script's quota, not an outage (not retryable)
        error = DataAccessError if limited else DataSourceUnavailable
        raise error(f"data gateway at {self.base_url} unavailable for {call}: {last} "
                    f"(gave up after {self.retry.attempts} attempts)")

    def _out_of_time(self, call: str, last: str, down: bool) -> Exception:
        """The execution's time ran out before an answer: an outage (DataSourceUnavailable, retryable)
        when the gateway itself said it could not serve or refused the connection, which a script cannot
        cause; otherwise the read took the time (DeadlineExceeded: the execution's own timeout)."""
        if down:
            return DataSourceUnavailable(f"data gateway at {self.base_url} unavailable for {call} until the "
                                         f"execution's time ran out: {last}")
        return DeadlineExceeded(f"{call} did not finish within the execution's time: {last}")

    def _raise_final(self, call: str, response: RawReply, script_id: str | None) -> None:
        status, message = response.status, _error_message(response)
        error: dict = {}
        with contextlib.suppress(ValueError, AttributeError):
            error = response.json().get("error", {})
        if status == 404 and error.get("code") == "no_output" and script_id:
            missing = (error.get("details") or {}).get("missing_bar_ends")
            if isinstance(missing, list) and missing and all(_is_number(t) for t in missing):
                # a realtime read whose series is not complete up to the event: maybe still in flight
                raise DependencyNotPublished(script_id, [float(t) for t in missing],
                                             str(error.get("message") or "")[:300] or None)
            raise DependencyUnavailable(script_id)
        if status in (401, 403):
            raise DataDenied(f"data gateway at {self.base_url} denied {call}: {message}")
        if status in (400, 422):
            raise DataRequestError(f"{call} rejected by the data gateway: {message}")
        raise DataAccessError(f"data gateway at {self.base_url} failed {call}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _window(limit: int | None, start: float | None, end: float | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = int(limit)
    if start is not None:
        params["start"] = repr(float(start))
    if end is not None:
        params["end"] = repr(float(end))
    return params
