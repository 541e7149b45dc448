"""Script function handler: verify the signed invocation token, then run the script in the sandbox.

Reads function/script.py and function/meta.json (next to this file). Accepts one execution
{"instrument_key","timeframe","params","timestamp","execution_token"?} or {"items": [...],
"execution_token"?}. Reads go to gateway-fn through GatewayClient, bound per request to the
execution token; the token stays here in the trusted supervisor and never reaches the sandboxed child.

Startup: importing this module starts the sandbox (zygote, preloaded modules, pre-forked children).
Both ways the function is served - index.py (of-watchdog) and the local provider's runner - import
the handler before they listen, so the process only reports ready once the first request is warm.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from customscripts import logs
from customscripts.config import settings
from customscripts.errors import ApiError, BadRequest, PayloadTooLarge, ServiceUnavailable, Unauthorized
from customscripts.sandbox.datasource import DataSource
from customscripts.sandbox.invocation import verify_invocation_token
from customscripts.sandbox.limits import SandboxLimits
from customscripts.sandbox.supervisor import ExecutionRequest, IsolationUnavailable, Supervisor

if TYPE_CHECKING:
    from requests.adapters import HTTPAdapter

    from customscripts.gateway.client import GatewayClient

HERE = Path(__file__).resolve().parent
MAX_BODY = 1024 * 1024
LIMIT_KEYS = frozenset({"timeout_ms", "memory_mb", "cpu_seconds", "max_output_bytes", "max_log_bytes"})
log = logs.get("customscripts.script_fn")

_lock = threading.Lock()
_supervisor: Supervisor | None = None
_sample_data: DataSource | None = None
_meta: dict[str, Any] = json.loads((HERE / "meta.json").read_text()) if (HERE / "meta.json").exists() else {}


def function_name() -> str:
    """This function's name, which every invocation token must carry: CS_FUNCTION_NAME (set by the
    provider), else meta.json's function_name, else the platform's name for script_id@version."""
    name = settings().function_name or _meta.get("function_name")
    if name:
        return str(name)
    if _meta.get("script_id") is not None and _meta.get("version") is not None:
        from customscripts.faas.naming import function_name as fn_name

        return fn_name(str(_meta["script_id"]), _meta["version"])
    return ""


def _limits(meta: dict) -> SandboxLimits:
    cfg = settings()
    tier = cfg.tier(str(meta.get("tier") or "pro")) or next(iter(cfg.tiers.values()))
    given = {k: v for k, v in (meta.get("limits") or {}).items() if v is not None}  # unset: the tier's
    overrides: dict[str, Any] = {k: v for k, v in given.items() if k in LIMIT_KEYS}
    if "allowed_modules" in given:
        overrides["allowed_modules"] = frozenset(given["allowed_modules"])
    return SandboxLimits.from_tier(tier, **overrides)


def warm() -> Supervisor:
    """The function's supervisor, started once per process (at import; again after a failure)."""
    global _supervisor
    with _lock:
        if _supervisor is None:
            source = (HERE / "script.py").read_text()
            _supervisor = Supervisor(source, output_schema=_meta.get("output_schema"), limits=_limits(_meta),
                                     filename="script.py")
        return _supervisor


_gateway_pool: HTTPAdapter | None = None


def _gateway(token: str) -> GatewayClient:
    """A GatewayClient for one execution token. Keep-alive connections to gateway-fn are shared by all
    requests (one HTTPAdapter pool), but not the Session: GatewayClient writes the token into its
    session's headers, so a shared Session would let concurrent requests read with each other's
    token. A Session per request costs about 10 us."""
    global _gateway_pool
    import requests
    from requests.adapters import HTTPAdapter

    from customscripts.gateway.client import GatewayClient

    if _gateway_pool is None:
        _gateway_pool = HTTPAdapter(pool_connections=1, pool_maxsize=16, max_retries=0)
    session = requests.Session()
    session.mount("http://", _gateway_pool)
    session.mount("https://", _gateway_pool)
    return GatewayClient(settings().data_gateway_url, token, session=session)


def _sample_source() -> DataSource:
    global _sample_data
    if _sample_data is None:
        from customscripts.sandbox.sampledata import SampleDataSource

        _sample_data = SampleDataSource().preload()
    return _sample_data


def _data_source(token: Any, clients: dict[str, GatewayClient]) -> DataSource:
    """One GatewayClient per distinct execution token in a request (its reads are cached per call)."""
    if token:
        if not isinstance(token, str):
            raise BadRequest("execution_token must be a string", code="invalid_execution_token")
        if token not in clients:
            clients[token] = _gateway(token)
        return clients[token]
    if settings().function_sample_data:
        return _sample_source()
    raise BadRequest("execution_token is required", code="missing_execution_token")


def _item(raw: Any, default_token: Any, clients: dict[str, GatewayClient]) -> ExecutionRequest:
    if not isinstance(raw, dict):
        raise BadRequest("each execution must be an object")
    try:
        key, tf = raw["instrument_key"], raw["timeframe"]
        ts = float(raw["timestamp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest("instrument_key, timeframe and timestamp are required") from exc
    params = raw.get("params") or {}
    if not isinstance(key, str) or not isinstance(tf, str) or not isinstance(params, dict):
        raise BadRequest("invalid execution fields")
    token = raw.get("execution_token") or default_token
    return ExecutionRequest(key, tf, params, ts, data=_data_source(token, clients))


def _json(status: int, body: Any) -> dict:
    return {"statusCode": status, "body": json.dumps(body), "headers": {"Content-Type": "application/json"}}


def handle(event: Any, context: Any) -> dict:
    call_id = event.headers.get("X-Call-Id", "-") if event.headers else "-"
    logs.call_id_var.set(call_id)
    try:
        if event.path in ("/_/health", "/healthz"):
            return _json(200, {"ok": True})
        auth = event.headers.get("Authorization", "") or ""
        token = auth[7:] if auth.lower().startswith("bearer ") else event.headers.get("X-Invocation-Token", "")
        if not token:
            raise Unauthorized("invocation token required", code="invalid_invocation_token")
        claims = verify_invocation_token(token, function_name())
        if event.method != "POST":
            raise BadRequest("POST an execution or a batch")
        if len(event.body or b"") > MAX_BODY:
            raise PayloadTooLarge("request body too large")
        try:
            body = json.loads(event.body or b"{}")
        except ValueError as exc:
            raise BadRequest("body is not JSON") from exc
        try:
            sup = warm()
        except IsolationUnavailable as exc:
            raise ServiceUnavailable(str(exc), code="sandbox_unavailable") from exc
        clients: dict[str, GatewayClient] = {}
        if isinstance(body, dict) and "items" in body:
            items = body["items"]
            max_items = settings().sandbox_max_batch
            if not isinstance(items, list) or not items or len(items) > max_items:
                raise BadRequest(f"items must be a list of 1..{max_items} executions")
            reqs = [_item(x, body.get("execution_token"), clients) for x in items]
            results = sup.execute_batch(reqs)
            out = {"results": [r.to_dict() for r in results]}
        else:
            out = sup.execute(_item(body, None, clients)).to_dict()
        logs.event(log, "executed", user=claims.get("user"), items=len(out.get("results", [1])))
        return _json(200, out)
    except ApiError as exc:
        return {"statusCode": exc.status, "body": json.dumps(exc.body()),
                "headers": {"Content-Type": "application/json", **exc.headers}}


def _preload() -> None:
    import customscripts.gateway.client  # noqa: F401 - used by the first request

    if settings().function_sample_data:
        _sample_source()


def _startup() -> None:
    """Start the sandbox now, not on the first request. The zygote boots in its own process while a
    thread imports the gateway client (and loads sample data when the function serves them). The
    supervisor is created on this (long-lived) thread on purpose: bubblewrap's --die-with-parent is
    PR_SET_PDEATHSIG, which fires when the thread that started the sandbox ends."""
    loader = threading.Thread(target=_preload, name="preload", daemon=True)
    loader.start()
    try:
        warm()
    finally:
        loader.join()


try:
    _startup()
except Exception as exc:  # retried by the first request (answered 503 while it fails)
    logs.event(log, "sandbox warm-up failed at startup; retrying on the first request", logging.ERROR,
               error=repr(exc))
