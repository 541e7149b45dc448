"""A small typed Python client for the public API (registry-fn), one explicit method per route.

Why: the demo, the tests and the CLI all talk to the API; they share this one client instead of
each building URLs and decoding error bodies. Every non-2xx answer becomes an `ApiError` subclass
(chosen by status) carrying the API's `code`, `message`, `details`, HTTP `status` and `Retry-After`,
in the manner of minio's S3Error or redis-py's exception classes. Answers are the API's JSON.

    from customscripts.client import Client
    api = Client.from_settings(token)            # or Client(base_url, token)
    api.create_script("sma", source, name="SMA")
    api.publish("sma")
    api.execute("sma", instrument_key="GOOG", timeframe="1d", params={"period": 20})
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from customscripts.config import Settings, settings

JSON = dict[str, Any]


class ClientError(Exception):
    """Base of everything the client raises."""


class TransportError(ClientError):
    """The API could not be reached, or answered something that is not the API's JSON."""


class ApiError(ClientError):
    """A non-2xx answer: `status` (HTTP), `code` (the API's machine-readable code), `message`."""

    def __init__(self, status: int, code: str, message: str, *, details: Any = None,
                 retry_after: float | None = None, call_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after
        self.call_id = call_id


class BadRequest(ApiError):
    """400: the body or a query parameter is not what the API reads."""


class Unauthorized(ApiError):
    """401: missing, malformed, expired or badly signed token."""


class Forbidden(ApiError):
    """403: tier, ownership, entitlement or quota."""


class NotFound(ApiError):
    """404: no such script, version, subscription or result (or not visible to the caller)."""


class Conflict(ApiError):
    """409: taken id, nothing published, deprecated version, no room in the function budget."""


class Unprocessable(ApiError):
    """422: invalid ids, schemas, params, source."""


class RateLimited(ApiError):
    """429: too many requests or concurrent executes; see `retry_after`."""


class Unavailable(ApiError):
    """503: storage or capacity, or a version whose image is still building; see `retry_after`."""


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 422: Unprocessable, 429: RateLimited, 503: Unavailable}


def error_from_response(resp: requests.Response) -> ApiError:
    """The ApiError for a non-2xx answer; a body that is not the API's error shape keeps its status."""
    code, message, details = f"http_{resp.status_code}", (resp.reason or "error"), None
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
            details = err.get("details")
    except (ValueError, AttributeError):
        if resp.text:
            message = resp.text.strip().splitlines()[0][:200]
    retry = resp.headers.get("Retry-After")
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    cls = _BY_STATUS.get(resp.status_code, ApiError)
    return cls(resp.status_code, code, message, details=details, retry_after=retry_after,
               call_id=resp.headers.get("X-Call-Id"))


def read_token(cfg: Settings | None = None) -> str | None:
    """The caller's bearer token: $CS_TOKEN, else the file $CS_TOKEN_FILE (default
    ~/.config/customscripts/token); None when neither holds one."""
    cfg = cfg or settings()
    if cfg.api_token:
        return cfg.api_token.strip()
    try:
        text = Path(cfg.api_token_file).expanduser().read_text().strip()
    except OSError:
        return None
    return text or None


def _seg(value: object) -> str:
    """One path segment, percent-encoded: ids never change the route they are put in."""
    return quote(str(value), safe="")


class Client:
    """One API session: base URL, bearer token, a pooled requests.Session."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 60.0,
                 session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = session or requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def from_settings(cls, token: str | None = None, cfg: Settings | None = None, **kwargs: Any) -> Client:
        """A client for the configured API ($CS_API_URL, else the local stack's registry-fn) with
        `token`, else the one `read_token` finds."""
        cfg = cfg or settings()
        return cls(cfg.api_url or cfg.registry_url, token if token is not None else read_token(cfg), **kwargs)

    # ----------------------------------------------------------------- transport

    def request(self, method: str, path: str, body: Any = None, *, query: Mapping[str, Any] | None = None,
                ok: tuple[int, ...] = (200, 201, 204)) -> Any:
        """One call; the decoded JSON answer (None for 204), or the ApiError for its status."""
        params = {k: (json.dumps(v) if isinstance(v, dict | list) else v)
                  for k, v in (query or {}).items() if v is not None}
        try:
            resp = self.http.request(method, self.base_url + path, json=body, params=params or None,
                                     timeout=self.timeout)
        except requests.RequestException as exc:
            raise TransportError(f"cannot reach {self.base_url}: {type(exc).__name__}") from None
        if resp.status_code not in ok:
            raise error_from_response(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise TransportError(f"{method} {path} answered {resp.status_code} with a body that is not JSON") from None

    # ----------------------------------------------------------------- scripts

    def openapi(self) -> JSON:
        return self.request("GET", "/openapi.json")

    def list_scripts(self, *, owner: str | None = None, mine: bool | None = None, status: str | None = None,
                     runtime_mode: str | None = None, marketplace: bool | None = None, q: str | None = None,
                     limit: int | None = None, cursor: str | None = None) -> JSON:
        """The scripts the caller may see: own, team/org/user-shared, entitled marketplace ones.
        Answers `{"scripts": [...], "next_cursor": str|None}`."""
        flags = {"mine": mine, "marketplace": marketplace}
        query = {"owner": owner, "status": status, "runtime_mode": runtime_mode, "q": q, "limit": limit,
                 "cursor": cursor, **{k: ("true" if v else "false") for k, v in flags.items() if v is not None}}
        return self.request("GET", "/scripts", query=query)

    def iter_scripts(self, *, cursor: str | None = None, **filters: Any) -> Iterator[JSON]:
        """Every page of list_scripts (from `cursor` on), script by script."""
        for _ in range(10_000):  # bounded: a page is at least one script
            page = self.list_scripts(cursor=cursor, **filters)
            yield from page["scripts"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def create_script(self, script_id: str | None, source: str, *, name: str | None = None, **fields: Any) -> JSON:
        """POST /scripts: the script and its draft (fields: description, runtime_mode, permissions,
        input_schema, output_schema, depends_on, limits)."""
        body: JSON = {"name": name or script_id or "script", "source": source, **fields}
        if script_id:
            body["script_id"] = script_id
        return self.request("POST", "/scripts", body)

    def edit_script(self, script_id: str, **fields: Any) -> JSON:
        """PATCH the draft: the given fields replace the draft's."""
        return self.request("PATCH", f"/scripts/{_seg(script_id)}", fields)

    def get_script(self, script_id: str) -> JSON:
        return self.request("GET", f"/scripts/{_seg(script_id)}")

    def publish(self, script_id: str) -> JSON:
        """Freeze the draft into the next version; `unchanged: true` when nothing changed."""
        return self.request("POST", f"/scripts/{_seg(script_id)}/publish")

    def versions(self, script_id: str) -> JSON:
        return self.request("GET", f"/scripts/{_seg(script_id)}/versions")

    def get_version(self, script_id: str, version: int | str) -> JSON:
        return self.request("GET", f"/scripts/{_seg(script_id)}/versions/{_seg(version)}")

    def deprecate(self, script_id: str, version: int, *, reason: str | None = None,
                  undo: bool = False) -> JSON:
        """Deprecate a version (owner): no new subscriptions to it; running ones go on."""
        body = {"reason": reason} if reason else {}
        if undo:
            return self.request("DELETE", f"/scripts/{_seg(script_id)}/versions/{_seg(version)}/deprecation")
        return self.request("POST", f"/scripts/{_seg(script_id)}/versions/{_seg(version)}/deprecate", body)

    def marketplace_subscribe(self, script_id: str) -> JSON:
        return self.request("POST", f"/scripts/{_seg(script_id)}/marketplace/subscribe")

    # ----------------------------------------------------------------- running

    def execute(self, script_id: str, *, instrument_key: str, timeframe: str, params: Mapping[str, Any] | None = None,
                version: int | None = None, timestamp: float | None = None, store: bool = False) -> JSON:
        body: JSON = {"instrument_key": instrument_key, "timeframe": timeframe, "params": dict(params or {})}
        if version is not None:
            body["version"] = version
        if timestamp is not None:
            body["timestamp"] = timestamp
        if store:
            body["store"] = True
        return self.request("POST", f"/scripts/{_seg(script_id)}/execute", body)

    def stored_execution(self, call_id: str) -> JSON:
        return self.request("GET", f"/executions/{_seg(call_id)}")

    def series(self, script_id: str, *, instrument_key: str, timeframe: str, start: float | None = None,
               end: float | None = None, params: Mapping[str, Any] | None = None, version: int | None = None,
               **fields: Any) -> JSON:
        """POST /scripts/{id}/series: the script's outputs at every bar end of a range."""
        body: JSON = {"instrument_key": instrument_key, "timeframe": timeframe, "params": dict(params or {}),
                      **{k: v for k, v in {"start": start, "end": end, "version": version}.items() if v is not None},
                      **fields}
        return self.request("POST", f"/scripts/{_seg(script_id)}/series", body)

    # ----------------------------------------------------------------- realtime

    def subscribe(self, script_id: str, *, instrument_key: str, timeframe: str,
                  params: Mapping[str, Any] | None = None, version: int | None = None,
                  backfill: int | None = None) -> JSON:
        """`backfill`: outputs at this many past bar ends first (default: the tier's)."""
        body: JSON = {"instrument_key": instrument_key, "timeframe": timeframe, "params": dict(params or {})}
        if version is not None:
            body["version"] = version
        if backfill is not None:
            body["backfill"] = backfill
        return self.request("POST", f"/scripts/{_seg(script_id)}/subscribe", body)

    def unsubscribe(self, script_id: str, subscription_id: int | str) -> None:
        self.request("DELETE", f"/scripts/{_seg(script_id)}/subscriptions/{_seg(subscription_id)}")

    def subscriptions(self, script_id: str | None = None) -> JSON:
        return self.request("GET", "/subscriptions", query={"script_id": script_id})

    def signal(self, instrument_key: str, script_id: str, *, timeframe: str,
               params: Mapping[str, Any] | None = None, history: int | None = None) -> JSON:
        """The latest realtime value, like a built-in indicator (`history=N` adds the last N)."""
        query = {"timeframe": timeframe, "params": dict(params) if params else None, "history": history}
        return self.request("GET", f"/signals/{_seg(instrument_key)}/custom/{_seg(script_id)}", query=query)


def local_token(user_id: str, tenant: str, tier: str = "pro", **claims: Any) -> str:
    """A token signed with the local stack's JWT secret (development only: production tokens come from
    the product's identity service)."""
    from customscripts.auth import issue_user_token

    return issue_user_token(user_id, tenant, tier, **claims)


def default_token_file(cfg: Settings | None = None) -> Path:
    return Path((cfg or settings()).api_token_file).expanduser()


__all__ = ["JSON", "ApiError", "BadRequest", "Client", "ClientError", "Conflict", "Forbidden", "NotFound",
           "RateLimited", "TransportError", "Unauthorized", "Unavailable", "Unprocessable", "default_token_file",
           "error_from_response", "local_token", "read_token"]
