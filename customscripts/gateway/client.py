"""GatewayClient: how the sandbox supervisor answers a script's read calls (the `DataSource` protocol).

One keep-alive `requests.Session` per client. Transient failures (connection errors, timeouts,
502/503/504, 429) are retried a bounded number of times with exponential backoff and jitter, a 429
waiting for its Retry-After (capped); after that the call fails with DataAccessError naming the
gateway URL and the call. The token stays here, in the trusted supervisor, and never reaches the child.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter

TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


try:  # the sandbox's classes are what the supervisor catches and maps to execution statuses
    from customscripts.sandbox.datasource import DataAccessError, DataDenied, DependencyUnavailable
except ImportError:  # pragma: no cover - sandbox package absent: compatible stand-ins

    class DataAccessError(Exception):  # type: ignore[no-redef]
        """The gateway could not answer (down after retries, or a server error)."""

    class DataDenied(Exception):  # type: ignore[no-redef]
        """The execution token does not allow this read (401/403)."""

    class DependencyUnavailable(Exception):  # type: ignore[no-redef]
        """A script this execution depends on has no output to read."""

        def __init__(self, script_id: str, message: str | None = None) -> None:
            super().__init__(message or f"dependency {script_id!r} has no output available")
            self.script_id = script_id


class DataRequestError(DataAccessError, ValueError):
    """The gateway rejected the call's arguments (400/422): the script's mistake, not an outage."""


def _retry_after(response: requests.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _error_message(response: requests.Response) -> str:
    try:
        error = response.json().get("error", {})
        return f"{response.status_code} {error.get('code', '')}: {error.get('message', '')}".strip()
    except (ValueError, AttributeError):
        return f"{response.status_code} {response.text[:200]}"


class GatewayClient:
    """Data client for one execution: `get_market_data`, `get_metric`, `get_script_output`."""

    def __init__(self, base_url: str, token: str, *, attempts: int = 4, backoff_s: float = 0.05,
                 max_backoff_s: float = 1.0, retry_after_cap_s: float = 5.0,
                 timeout: tuple[float, float] = (1.0, 10.0), session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retry_after_cap_s = retry_after_cap_s
        self.timeout = timeout
        self.sleep = sleep
        self.requests_sent = 0  # every HTTP attempt, retries included (observability, tests)
        self.retries = 0
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=8, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        session.headers["Authorization"] = f"Bearer {token}"
        self.session = session

    def close(self) -> None:
        self.session.close()

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

    def _backoff(self, attempt: int) -> float:
        """Exponential with equal jitter: half the step fixed, half random, so callers spread out."""
        step = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        return step / 2 + random.uniform(0, step / 2)

    def _get(self, call: str, path: str, params: dict[str, Any], *, script_id: str | None = None) -> dict:
        url = self.base_url + path
        last = "no attempt made"
        for attempt in range(self.attempts):
            wait: float | None = None
            self.requests_sent += 1
            try:
                response = self.session.get(url, params=params, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise DataAccessError(
                            f"data gateway at {self.base_url} returned invalid JSON for {call}") from None
                if status not in TRANSIENT_STATUS:
                    self._raise_final(call, response, script_id)
                last = _error_message(response)
                if status == 429 or status == 503:
                    after = _retry_after(response)
                    if after is not None:
                        wait = min(after, self.retry_after_cap_s)
            if attempt + 1 < self.attempts:
                self.retries += 1
                self.sleep(wait if wait is not None else self._backoff(attempt))
        raise DataAccessError(
            f"data gateway at {self.base_url} unavailable for {call}: {last} "
            f"(gave up after {self.attempts} attempts)")

    def _raise_final(self, call: str, response: requests.Response, script_id: str | None) -> None:
        status, message = response.status_code, _error_message(response)
        code = ""
        with contextlib.suppress(ValueError, AttributeError):
            code = response.json().get("error", {}).get("code", "")
        if status == 404 and code == "no_output" and script_id:
            raise DependencyUnavailable(script_id)
        if status in (401, 403):
            raise DataDenied(f"data gateway at {self.base_url} denied {call}: {message}")
        if status in (400, 422):
            raise DataRequestError(f"{call} rejected by the data gateway: {message}")
        raise DataAccessError(f"data gateway at {self.base_url} failed {call}: {message}")


def _window(limit: int | None, start: float | None, end: float | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = int(limit)
    if start is not None:
        params["start"] = repr(float(start))
    if end is not None:
        params["end"] = repr(float(end))
    return params
