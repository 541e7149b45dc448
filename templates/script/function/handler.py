"""Script function handler: verify the signed invocation token, then run the script in the sandbox.

Reads function/script.py and function/meta.json (next to this file). Accepts one execution
{"instrument_key","timeframe","params","timestamp","execution_token"?} or {"items": [...]}.
The execution token (for gateway-fn reads) stays here in the trusted supervisor; it never reaches
the sandboxed child.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from customscripts import logs
from customscripts.config import settings
from customscripts.errors import ApiError, BadRequest, PayloadTooLarge, Unauthorized
from customscripts.sandbox import ExecutionRequest, SampleDataSource, SandboxLimits, Supervisor
from customscripts.sandbox.invocation import verify_invocation_token

HERE = Path(__file__).resolve().parent
MAX_BODY = 1024 * 1024
MAX_ITEMS = 1000
log = logs.get("customscripts.script_fn")

_lock = threading.Lock()
_supervisor: Supervisor | None = None
_meta: dict[str, Any] = {}


def function_name() -> str:
    return os.environ.get("CS_FUNCTION_NAME") or _meta.get("function_name") or os.environ.get("HOSTNAME", "")


def _limits(meta: dict) -> SandboxLimits:
    tier = settings().tier(str(meta.get("tier") or "pro")) or next(iter(settings().tiers.values()))
    overrides = {k: v for k, v in (meta.get("limits") or {}).items()
                 if k in {"timeout_ms", "memory_mb", "cpu_seconds", "max_output_bytes", "max_log_bytes"}}
    if "allowed_modules" in (meta.get("limits") or {}):
        overrides["allowed_modules"] = frozenset(meta["limits"]["allowed_modules"])
    return SandboxLimits.from_tier(tier, **overrides)


def warm() -> Supervisor:
    """Start the zygote once per function process (called at startup and lazily)."""
    global _supervisor, _meta
    with _lock:
        if _supervisor is None:
            _meta = json.loads((HERE / "meta.json").read_text()) if (HERE / "meta.json").exists() else {}
            source = (HERE / "script.py").read_text()
            _supervisor = Supervisor(source, output_schema=_meta.get("output_schema"), limits=_limits(_meta),
                                     filename="script.py")
        return _supervisor


def _data_source(token: str | None) -> Any:
    if token:
        from customscripts.sandbox.gatewaysource import GatewayDataSource

        return GatewayDataSource(token)
    if os.environ.get("CS_FUNCTION_SAMPLE_DATA") == "1":
        return SampleDataSource()
    raise BadRequest("execution_token is required", code="missing_execution_token")


def _item(raw: Any, default_token: str | None) -> ExecutionRequest:
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
    return ExecutionRequest(key, tf, params, ts, data=_data_source(token))


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
        sup = warm()
        if isinstance(body, dict) and "items" in body:
            items = body["items"]
            if not isinstance(items, list) or not items or len(items) > MAX_ITEMS:
                raise BadRequest(f"items must be a list of 1..{MAX_ITEMS} executions")
            reqs = [_item(x, body.get("execution_token")) for x in items]
            results = sup.execute_batch(reqs)
            out = {"results": [r.to_dict() for r in results]}
        else:
            out = sup.execute(_item(body, None)).to_dict()
        logs.event(log, "executed", user=claims.get("user"), items=len(out.get("results", [1])))
        return _json(200, out)
    except ApiError as exc:
        return {"statusCode": exc.status, "body": json.dumps(exc.body()),
                "headers": {"Content-Type": "application/json", **exc.headers}}
