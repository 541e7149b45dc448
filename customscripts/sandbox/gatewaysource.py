"""DataSource backed by gateway-fn over HTTP with the execution's scoped token (trusted side only).

Retries transient failures (connection errors, 429, 5xx) with bounded exponential backoff, then
raises DataAccessError; 401/403 -> DataDenied; 404 on a script output -> DependencyUnavailable.
Query parameter names follow DESIGN.md §3.4; adjust here if gateway-fn differs.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from customscripts.config import settings

from .datasource import DataAccessError, DataDenied, DependencyUnavailable

RETRIES = 3
BACKOFF_S = 0.05
TIMEOUT_S = 5.0


class GatewayDataSource:
    def __init__(self, token: str, base_url: str | None = None, session: requests.Session | None = None) -> None:
        self.token = token
        self.base = (base_url or settings().data_gateway_url).rstrip("/")
        self.http = session or requests.Session()

    def _get(self, path: str, params: dict[str, Any], dependency: str | None = None) -> dict:
        clean = {k: v for k, v in params.items() if v is not None}
        last = ""
        for attempt in range(RETRIES + 1):
            try:
                r = self.http.get(self.base + path, params=clean, timeout=TIMEOUT_S,
                                  headers={"Authorization": f"Bearer {self.token}"})
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"
            else:
                if r.status_code == 200:
                    return r.json()
                if r.status_code in (401, 403):
                    raise DataDenied(f"gateway denied {path}")
                if r.status_code == 404 and dependency:
                    raise DependencyUnavailable(dependency)
                if r.status_code not in (429, 500, 502, 503, 504):
                    raise DataAccessError(f"gateway returned {r.status_code} for {path}")
                last = f"HTTP {r.status_code}"
            if attempt < RETRIES:
                time.sleep(BACKOFF_S * (2 ** attempt))
        raise DataAccessError(f"data gateway unavailable after {RETRIES + 1} attempts ({last})")

    def get_market_data(self, instrument_key: str, timeframe: str, *, limit: int | None = None,
                        start: float | None = None, end: float | None = None) -> dict:
        return self._get("/data/market", {"instrument_key": instrument_key, "timeframe": timeframe,
                                          "limit": limit, "start": start, "end": end})

    def get_metric(self, instrument_key: str, name: str, *, limit: int | None = None,
                   start: float | None = None, end: float | None = None) -> dict:
        return self._get("/data/metrics", {"instrument_key": instrument_key, "name": name, "limit": limit,
                                           "start": start, "end": end})

    def get_script_output(self, script_id: str, instrument_key: str, timeframe: str, *,
                          params: dict | None = None, history: int | None = None) -> dict:
        import json

        q = {"instrument_key": instrument_key, "timeframe": timeframe,
             "params": json.dumps(params, sort_keys=True) if params else None}
        if history:
            return self._get(f"/data/scripts/{script_id}/history", {**q, "limit": history}, dependency=script_id)
        return self._get(f"/data/scripts/{script_id}/latest", q, dependency=script_id)
