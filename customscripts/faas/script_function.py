"""One published script version served as a function: the invocation-token check, the request's
executions (one, or a batch with its optional prefetch), the data source each reads from, and the
sandbox supervisor that runs them.

The function's folder (`function/` in its build context) holds the version's `script.py` and
`meta.json`; the template's `function/handler.py` is only `ScriptFunction.start(folder)`, so what
an image runs and what the tests run is this module.

Reads go to gateway-fn through GatewayClient, bound per request to the execution token; the token
stays here in the trusted supervisor and never reaches the sandboxed child. A batch from the realtime
scheduler may carry `prefetch` (candle windows and the dependency outputs it has just published, see
customscripts/sandbox/prefetch.py): it is accepted only under a MAC made with the invocation secret
over this function, the invocation token's tenant and the exact items (so an invocation token alone
cannot feed a script forged data), only with outputs of this version's own `depends_on`, and the
supervisor answers a read from it only when it certainly equals gateway-fn's answer for that item -
otherwise the read still goes to gateway-fn.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from customscripts import logs, metrics
from customscripts.config import settings
from customscripts.errors import DomainError, Malformed, TooLarge, Unauthenticated, Unavailable
from customscripts.http import error_response, parse_json
from customscripts.sandbox.datasource import DataSource
from customscripts.sandbox.invocation import function_request_proof, verify_invocation_token, verify_prefetch
from customscripts.sandbox.limits import SandboxLimits
from customscripts.sandbox.prefetch import Prefetched, PrefetchError
from customscripts.sandbox.supervisor import ExecutionRequest, IsolationUnavailable, Supervisor

if TYPE_CHECKING:
    from customscripts.gateway.client import GatewayClient

MAX_BODY = 8 * 1024 * 1024  # a realtime batch with prefetched windows
LIMIT_KEYS = frozenset({"timeout_ms", "memory_mb", "cpu_seconds", "max_output_bytes", "max_log_bytes"})
HEALTH_PATHS = ("/_/health", "/healthz")
# What the sandbox loads in its own processes (zygote, children), so an import here would not show it
# missing: the allowlisted third-party packages scripts use (their own dependencies come with them),
# seccomp, and output-schema validation.
SANDBOX_MODULES = ("numpy", "pandas", "pyseccomp", "jsonschema")
log = logs.get("customscripts.script_fn")

_sample_data: DataSource | None = None


def _gateway(token: str) -> GatewayClient:
    """A GatewayClient for one execution token. GatewayClient sends the token with each call over one
    process-wide keep-alive pool, so clients of concurrent requests share connections, never tokens."""
    from customscripts.gateway.client import GatewayClient

    return GatewayClient(settings().data_gateway_url, token)


def _sample_source() -> DataSource:
    global _sample_data
    if _sample_data is None:
        from customscripts.sandbox.sampledata import SampleDataSource

        _sample_data = SampleDataSource().preload()
    return _sample_data


def _json(status: int, body: Any) -> dict:
    return {"statusCode": status, "body": json.dumps(body), "headers": {"Content-Type": "application/json"}}


class ScriptFunction:
    """The handler of one script version's function (python3-http `handle(event, context)`)."""

    def __init__(self, source: str, meta: dict[str, Any]) -> None:
        self.source = source
        self.meta = meta
        self.supervisor: Supervisor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: Path) -> ScriptFunction:
        meta_file = folder / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return cls((folder / "script.py").read_text(), meta)

    @classmethod
    def start(cls, folder: Path) -> ScriptFunction:
        """The function of `folder`, its sandbox started now rather than on the first request: the
        zygote boots in its own process while a thread imports the gateway client (and loads sample
        data when the function serves them). Served both ways (of-watchdog, the local provider), the
        handler is imported before the server listens, so the process reports ready only once warm.
        The supervisor is created on this long-lived thread on purpose: bubblewrap's --die-with-parent
        is PR_SET_PDEATHSIG, which fires when the thread that started the sandbox ends."""
        function = cls.from_folder(folder)
        _require(SANDBOX_MODULES)
        failed: list[BaseException] = []
        loader = threading.Thread(target=_preload, args=(failed,), name="preload", daemon=True)
        loader.start()
        try:
            function.warm()
        except Exception as exc:  # retried by the first request (answered 503 while it fails)
            logs.event(log, "sandbox warm-up failed at startup; retrying on the first request", logging.ERROR,
                       error=repr(exc))
        finally:
            loader.join()
        if failed:  # a module the function needs is missing from its image: fail now, not on a request
            function.close()
            raise failed[0]
        return function

    @property
    def name(self) -> str:
        """The name every invocation token must carry: CS_FUNCTION_NAME (set by the provider), else
        meta.json's function_name, else the platform's name for script_id@version."""
        name = settings().function_name or self.meta.get("function_name")
        if name:
            return str(name)
        if self.meta.get("script_id") is not None and self.meta.get("version") is not None:
            from customscripts.faas.naming import function_name

            return function_name(str(self.meta["script_id"]), self.meta["version"])
        return ""

    def limits(self) -> SandboxLimits:
        cfg = settings()
        tier = cfg.tier(str(self.meta.get("tier") or "pro")) or next(iter(cfg.tiers.values()))
        given = {k: v for k, v in (self.meta.get("limits") or {}).items() if v is not None}  # unset: the tier's
        overrides: dict[str, Any] = {k: v for k, v in given.items() if k in LIMIT_KEYS}
        if "allowed_modules" in given:
            overrides["allowed_modules"] = frozenset(given["allowed_modules"])
        return SandboxLimits.from_tier(tier, **overrides)

    def warm(self) -> Supervisor:
        """The function's supervisor, started once per process (at start; again after a failure)."""
        with self._lock:
            if self.supervisor is None:
                self.supervisor = Supervisor(self.source, output_schema=self.meta.get("output_schema"),
                                             limits=self.limits(), filename="script.py")
            return self.supervisor

    def close(self) -> None:
        with self._lock:
            if self.supervisor is not None:
                self.supervisor.close()
                self.supervisor = None

    # ------------------------------------------------------------------ requests

    def _data_source(self, token: Any, clients: dict[str, GatewayClient]) -> DataSource:
        """One GatewayClient per distinct execution token in a request (its reads are cached per call)."""
        if token:
            if not isinstance(token, str):
                raise Malformed("execution_token must be a string", code="invalid_execution_token")
            if token not in clients:
                clients[token] = _gateway(token)
            return clients[token]
        if settings().function_sample_data:
            return _sample_source()
        raise Malformed("execution_token is required", code="missing_execution_token")

    def _prefetch(self, body: dict, claims: dict) -> Prefetched | None:
        """The batch's verified prefetch, or None when it has none (then every read goes to gateway-fn)."""
        raw = body.get("prefetch")
        if raw is None:
            return None
        tenant = claims.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated("prefetch needs an invocation token bound to a tenant", code="invalid_prefetch")
        data = verify_prefetch(raw, self.name, tenant, body.get("items"), body.get("execution_token"))
        try:
            return Prefetched.parse(data, tenant=tenant,
                                    dependencies=[str(d) for d in self.meta.get("depends_on") or []])
        except PrefetchError as exc:
            raise Malformed(f"invalid prefetch: {exc}", code="invalid_prefetch") from None

    def _item(self, raw: Any, default_token: Any, clients: dict[str, GatewayClient],
              prefetch: Prefetched | None = None) -> ExecutionRequest:
        if not isinstance(raw, dict):
            raise Malformed("each execution must be an object")
        try:
            key, tf = raw["instrument_key"], raw["timeframe"]
            ts = raw["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
                raise ValueError("timestamp must be a finite number")
            ts = float(ts)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise Malformed("instrument_key, timeframe and timestamp (a finite number) are required") from exc
        params = raw.get("params") or {}
        if not isinstance(key, str) or not isinstance(tf, str) or not isinstance(params, dict):
            raise Malformed("invalid execution fields")
        token = raw.get("execution_token") or default_token
        return ExecutionRequest(key, tf, params, ts, data=self._data_source(token, clients), prefetch=prefetch)

    # ------------------------------------------------------------ the function URL

    def _user_call(self, event: Any, user_token: str, call_id: str) -> dict:
        """A user's `POST /function/<this function>`: the same body, checks, statuses, answer and audit
        row as `POST /scripts/{id}/execute`. This function can reach only gateway-fn, so it asks the
        registry through it to authorise the call (403/422/429 before any child starts), runs the one
        execution with the execution token it is given, and hands the result back for the registry to
        store, audit and shape. Both requests carry this function's proof (invocation secret)."""
        if event.method != "POST":
            raise Malformed("POST the execute request's JSON body")
        if len(event.body or b"") > MAX_BODY:
            raise TooLarge("request body too large")
        body = parse_json(event.body or b"{}", "body")
        if not isinstance(body, dict):
            raise Malformed("request body must be a JSON object", code="invalid_json")
        call_id = call_id if call_id and call_id != "-" else str(uuid.uuid4())
        asked = {"script_id": self.meta.get("script_id"), "version": self.meta.get("version"), "body": body}
        reply = self._registry("authorise", asked, call_id, user_token)
        if reply.status != 200:
            return _forward(reply)
        granted = reply.json()
        try:
            sup = self.warm()
        except IsolationUnavailable as exc:
            self._registry("complete", {"grant": granted["grant"], "failure": f"sandbox unavailable: {exc}"},
                           call_id)
            raise Unavailable(str(exc), code="sandbox_unavailable") from exc
        run = granted["execution"]
        data = self._data_source(granted["execution_token"], {})
        ran = sup.execute(ExecutionRequest(run["instrument_key"], run["timeframe"], run["params"],
                                           float(run["timestamp"]), data=data))
        metrics.observe_function_results([ran], "function_url")
        return _forward(self._registry("complete", {"grant": granted["grant"], "result": ran.to_dict()}, call_id))

    def _registry(self, step: str, body: dict, call_id: str, user_token: str | None = None) -> Any:
        """POST gateway-fn's /functions/<this>/<step> (forwarded to the registry) with this function's proof."""
        from customscripts.gateway.client import shared_pool

        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        headers = {"Content-Type": "application/json", "X-Call-Id": call_id,
                   "X-Function-Proof": function_request_proof(self.name, step, call_id, data)}
        if user_token is not None:
            headers["Authorization"] = f"Bearer {user_token}"
        pool, prefix = shared_pool(settings().data_gateway_url)
        try:
            return pool.request("POST", f"{prefix}/functions/{self.name}/{step}", data, headers, timeout=(2.0, 30.0))
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"gateway-fn unreachable: {type(exc).__name__}", code="registry_unavailable",
                              retry_after_s=1) from None

    def readiness(self) -> dict[str, metrics.Check]:
        """What this function needs to serve: its sandbox's zygote and gateway-fn (its one data path)."""
        def sandbox() -> None:
            sup = self.supervisor
            if sup is None or not sup.zygote_alive:
                raise RuntimeError("the sandbox's zygote is not running")

        return {"sandbox": sandbox, **metrics.dependency_checks("gateway-fn")}

    def handle(self, event: Any, context: Any) -> dict:
        """python3-http `handle`, counted by request kind and status (cs_function_requests_total)."""
        reply = self._handle(event, context)
        auth = (event.headers.get("Authorization", "") or "") if event.headers else ""
        kind = "function_url" if auth.lower().startswith("bearer ") and auth.count(".") == 2 else "invocation"
        metrics.FUNCTION_REQUESTS.labels(kind, str(reply.get("statusCode", 200))).inc()
        return reply

    def _handle(self, event: Any, context: Any) -> dict:
        call_id = event.headers.get("X-Call-Id", "-") if event.headers else "-"
        logs.call_id_var.set(call_id)
        try:
            if event.path in HEALTH_PATHS:
                return _json(200, {"ok": True})
            auth = event.headers.get("Authorization", "") or ""
            token = auth[7:] if auth.lower().startswith("bearer ") else event.headers.get("X-Invocation-Token", "")
            if not token:
                raise Unauthenticated("a user token or an invocation token is required", code="unauthorized")
            if token.count(".") == 2:  # a user's JWT: a call on this version's function URL
                return self._user_call(event, token, call_id)
            claims = verify_invocation_token(token, self.name)
            if event.method != "POST":
                raise Malformed("POST an execution or a batch")
            if len(event.body or b"") > MAX_BODY:
                raise TooLarge("request body too large")
            body = parse_json(event.body or b"{}", "body")
            try:
                sup = self.warm()
            except IsolationUnavailable as exc:
                raise Unavailable(str(exc), code="sandbox_unavailable") from exc
            clients: dict[str, GatewayClient] = {}
            prefetch: Prefetched | None = None
            if isinstance(body, dict) and "items" in body:
                items = body["items"]
                max_items = settings().sandbox_max_batch
                if not isinstance(items, list) or not items or len(items) > max_items:
                    raise Malformed(f"items must be a list of 1..{max_items} executions")
                prefetch = self._prefetch(body, claims)
                reqs = [self._item(x, body.get("execution_token"), clients, prefetch) for x in items]
                results = sup.execute_batch(reqs)
                metrics.observe_function_results(results, "batch")
                out = {"results": [r.to_dict() for r in results]}
                if prefetch is not None:
                    out["prefetched_reads"] = prefetch.hits  # reads that did not need gateway-fn
                    out["prefetch_bars"] = prefetch.bars  # candles the reads needed: sizes the next windows
            else:
                result = sup.execute(self._item(body, None, clients))
                metrics.observe_function_results([result], "execute")
                out = result.to_dict()
            logs.event(log, "executed", user=claims.get("user"), items=len(out.get("results", [1])),
                       prefetched_reads=prefetch.hits if prefetch is not None else 0)
            return _json(200, out)
        except DomainError as exc:
            reply = error_response(exc)
            return {**reply, "body": json.dumps(reply["body"])}


def _require(modules: tuple[str, ...]) -> None:
    """ModuleNotFoundError for the first of these that the function's environment lacks."""
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _forward(reply: Any) -> dict:
    """The registry's answer (through gateway-fn), passed on as it came: status, JSON body, Retry-After."""
    headers = {"Content-Type": "application/json"}
    if reply.headers.get("Retry-After"):
        headers["Retry-After"] = reply.headers["Retry-After"]
    return {"statusCode": reply.status, "body": reply.body.decode(), "headers": headers}


def _preload(failed: list[BaseException]) -> None:
    try:
        import customscripts.gateway.client  # noqa: F401 - used by the first request

        if settings().function_sample_data:
            _sample_source()
    except ImportError as exc:
        failed.append(exc)
