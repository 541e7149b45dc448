"""registry-fn's HTTP API: routes, request parsing and the OpenAPI document that describes them.

The handler in `registry-fn/handler.py` only calls `handle()`. Every route authenticates first
(401), then applies the tier gate (403) before reading the body, so a caller without the
`custom_scripts` feature causes no work at all. Errors are `{"error": {"code", "message", ...}}`.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from customscripts import ids, logs
from customscripts.app import app
from customscripts.auth import Principal, principal_from_request
from customscripts.errors import BadRequest, ServiceUnavailable, Unauthorized, Unprocessable
from customscripts.execution import ExecuteBody, ExecutionResponse, StoredExecution
from customscripts.http import Context, Event, Request, Response, RouteHandler, Router, json_response
from customscripts.inputs import check_query, parse_body
from customscripts.permissions import tier_of
from customscripts.registry.models import (
    MAX_SOURCE_BYTES,
    DeprecateBody,
    Deprecation,
    DraftCreate,
    DraftUpdate,
    ErrorBody,
    PublishResult,
    ScriptList,
    ScriptMeta,
    ScriptView,
    Subscription,
    VersionList,
    VersionView,
)

M = TypeVar("M", bound=BaseModel)

router = Router()
log = logs.get("customscripts.registry")


def handle(event: Event, context: Context | None = None) -> Response:
    return router.dispatch(event)


def _backend_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    import urllib3
    from minio.error import S3Error
    from psycopg_pool import PoolTimeout

    return (psycopg.OperationalError, PoolTimeout, S3Error, urllib3.exceptions.HTTPError)


def _guarded(func: RouteHandler) -> RouteHandler:
    """Storage outages are a retryable 503 with a JSON body, not an opaque 500."""

    @functools.wraps(func)
    def wrapper(req: Request) -> Response:
        try:
            return func(req)
        except _backend_errors() as exc:
            log.warning("registry backend unavailable: %s", type(exc).__name__)
            raise ServiceUnavailable("registry storage temporarily unavailable", code="backend_unavailable",
                                     headers={"Retry-After": "1"}) from None

    return wrapper


def route(method: str, template: str):
    def register(func: RouteHandler) -> RouteHandler:
        return router.route(method, template)(_guarded(func))

    return register


# ----------------------------------------------------------------- request helpers


def _caller(req: Request) -> Principal:
    principal = principal_from_request(req)
    tier_of(principal)
    return principal


def _script_id(req: Request, principal: Principal) -> str:
    """The path's script id as the platform-wide id (a bare chosen id resolves in the caller's tenant)."""
    return app().registry.resolve(principal, req.params["script_id"])


def _body(req: Request, model: type[M]) -> M:
    return parse_body(model, req.json_object(), "request")


# ----------------------------------------------------------------- routes


@route("GET", "/openapi.json")
def openapi_route(req: Request) -> Response:
    return json_response(openapi())


@route("POST", "/scripts")
def create_script(req: Request) -> Response:
    principal = _caller(req)
    body = _body(req, DraftCreate)
    meta = app().registry.create_draft(principal, body, req.call_id)
    return json_response(meta.model_dump(mode="json"), 201)


def _update(req: Request) -> Response:
    principal = _caller(req)
    script_id = _script_id(req, principal)
    body = _body(req, DraftUpdate)
    meta = app().registry.update_draft(principal, script_id, body, req.call_id)
    return json_response(meta.model_dump(mode="json"))


route("PUT", "/scripts/{script_id}")(_update)
route("PATCH", "/scripts/{script_id}")(_update)


@route("GET", "/scripts/{script_id}")
def get_script(req: Request) -> Response:
    principal = _caller(req)
    return json_response(app().registry.get(principal, _script_id(req, principal)))


@route("POST", "/scripts/{script_id}/publish")
def publish_script(req: Request) -> Response:
    principal = _caller(req)
    meta, unchanged = app().registry.publish(principal, _script_id(req, principal), req.call_id)
    return json_response({**meta.model_dump(mode="json"), "unchanged": unchanged,
                          "function_url": function_url(meta.script_id, meta.version)}, 200 if unchanged else 201)


@route("GET", "/scripts/{script_id}/versions")
def list_versions(req: Request) -> Response:
    principal = _caller(req)
    script_id = _script_id(req, principal)
    rows = app().registry.list_versions(principal, script_id)
    deprecated = app().registry.catalog.deprecations([script_id])
    versions = [{**r.as_json(), **_deprecation(deprecated.get((r.script_id, r.version))),
                 "function_url": function_url(r.script_id, r.version)} for r in rows]
    return json_response({"script_id": script_id, "versions": versions})


def _deprecation(found: tuple[Any, str | None] | None) -> dict[str, Any]:
    return {"deprecated_at": found[0].isoformat(), "deprecation_reason": found[1]} if found else {}


_LIST_FILTERS = {"limit", "cursor", "owner", "mine", "status", "runtime_mode", "marketplace", "q"}


def _flag(req: Request, name: str) -> bool | None:
    raw = req.query.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise Unprocessable(f"{name} must be true or false", code="invalid_parameter")
    return raw == "true"


@route("GET", "/scripts")
def list_scripts(req: Request) -> Response:
    """Own, shared and entitled marketplace scripts; filters and a cursor (registry/service.py)."""
    principal = _caller(req)
    check_query(req.query, _LIST_FILTERS)
    q = req.query
    raw_limit = q.get("limit", "50")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 200):
        raise Unprocessable("limit must be an integer from 1 to 200", code="invalid_parameter")
    choices = {"status": ("draft", "published", "deprecated"), "runtime_mode": ("onetime", "realtime")}
    for name, allowed in choices.items():
        if q.get(name) is not None and q.get(name) not in allowed:
            raise Unprocessable(f"{name} must be one of {', '.join(allowed)}", code="invalid_parameter")
    text = q.get("q")
    if text is not None and (len(text) > 100 or not text.isprintable()):
        raise Unprocessable("q must be printable text of at most 100 characters", code="invalid_parameter")
    owner = principal.user_id if _flag(req, "mine") else q.get("owner")
    if owner is not None:
        ids.owner_id(owner)
    items, cursor = app().registry.list_scripts(
        principal, limit=int(raw_limit), cursor=q.get("cursor"), owner_id=owner, runtime_mode=q.get("runtime_mode"),
        marketplace=_flag(req, "marketplace"), status=q.get("status"), text=text)
    for item in items:
        item["function_url"] = function_url(item["script_id"], item["latest_version"])
    return json_response({"scripts": items, "next_cursor": cursor})


def _deprecate(req: Request, deprecated: bool) -> Response:
    principal = _caller(req)
    script_id = _script_id(req, principal)
    has_body = bool((req.event.body or b"").strip())
    reason = _body(req, DeprecateBody).reason if deprecated and has_body else None
    return json_response(app().registry.deprecate(principal, script_id, req.params["version"], deprecated=deprecated,
                                             reason=reason, call_id=req.call_id))


@route("POST", "/scripts/{script_id}/versions/{version}/deprecate")
def deprecate_version(req: Request) -> Response:
    return _deprecate(req, True)


@route("DELETE", "/scripts/{script_id}/versions/{version}/deprecation")
def undeprecate_version(req: Request) -> Response:
    return _deprecate(req, False)


@route("GET", "/scripts/{script_id}/versions/{version}")
def get_version(req: Request) -> Response:
    principal = _caller(req)
    found = app().registry.get_version(principal, _script_id(req, principal), req.params["version"])
    if isinstance(found.get("version"), int):
        found = {**found, "function_url": function_url(str(found["script_id"]), found["version"])}
    return json_response(found)


def function_url(script_id: str, version: Any) -> str | None:
    """Where users call a published version directly with their own token (`POST`, the execute body):
    its OpenFaaS function behind the public gateway (sync; `/async-function/` with X-Callback-Url)."""
    from customscripts.config import settings
    from customscripts.faas.naming import function_name

    if not isinstance(version, int):
        return None
    return f"{settings().public_gateway_url}/function/{function_name(script_id, version)}"


@route("POST", "/scripts/{script_id}/marketplace/subscribe")
def subscribe(req: Request) -> Response:
    principal = _caller(req)
    script_id = _script_id(req, principal)
    created = app().registry.subscribe(principal, script_id, req.call_id)
    body = {"script_id": script_id, "user_id": principal.user_id, "tenant": principal.tenant,
            "created": created}
    return json_response(body, 201 if created else 200)


@route("POST", "/scripts/{script_id}/execute")
def execute(req: Request) -> Response:
    principal = _caller(req)
    result = app().executor.execute(principal, _script_id(req, principal), req.json_object(), req.call_id)
    return json_response(result)


@route("POST", "/functions/{function}/authorise")
def authorise_function_call(req: Request) -> Response:
    """Internal, reached through gateway-fn: a version's function asks whether the user calling its
    function URL may run it (the same checks as execute), with its own proof (invocation secret)."""
    function = _function_request(req, "authorise")
    principal = _caller(req)
    body = req.json_object()
    execute_body = body.get("body")
    if not isinstance(execute_body, dict):
        raise BadRequest("body must be the execute request's JSON object", code="invalid_json")
    return json_response(app().executor.authorise_function_call(
        principal, function, str(body.get("script_id", "")), body.get("version"), execute_body, req.call_id))


@route("POST", "/functions/{function}/complete")
def complete_function_call(req: Request) -> Response:
    """Internal, reached through gateway-fn: the function's result for a call it was granted."""
    function = _function_request(req, "complete")
    return json_response(app().executor.complete_function_call(function, req.call_id, req.json_object()))


def _function_request(req: Request, purpose: str) -> str:
    """The function named in the path, proven by its X-Function-Proof over this call and body."""
    from customscripts.sandbox.invocation import verify_function_request

    function = verify_function_request(req.header("X-Function-Proof"), purpose, req.call_id, req.event.body or b"")
    if function != req.params["function"]:
        raise Unauthorized("the proof is for another function", code="invalid_function_request")
    return function


@route("GET", "/executions/{call_id}")
def stored_execution(req: Request) -> Response:
    principal = _caller(req)
    return json_response(app().executor.stored(principal, req.params["call_id"]))


@route("POST", "/scripts/{script_id}/subscribe")
def subscribe_realtime(req: Request) -> Response:
    principal = _caller(req)
    body = app().realtime.subscribe(principal, _script_id(req, principal), req.json_object(), req.call_id)
    return json_response(body, 201 if body["created"] else 200)


@route("DELETE", "/scripts/{script_id}/subscriptions/{subscription_id}")
def unsubscribe_realtime(req: Request) -> Response:
    principal = _caller(req)
    app().realtime.unsubscribe(principal, _script_id(req, principal), req.params["subscription_id"],
                                  req.call_id)
    return {"statusCode": 204, "body": "", "headers": {}}


@route("GET", "/subscriptions")
def list_subscriptions(req: Request) -> Response:
    principal = _caller(req)
    check_query(req.query, ("script_id",))
    script_filter = req.query.get("script_id")
    if script_filter is not None:  # present means a filter: an empty or malformed one is a 422
        script_filter = app().registry.resolve(principal, script_filter)
    return json_response({"subscriptions": app().realtime.list(principal, script_filter)})


@route("GET", "/signals/{instrument_key}/custom/{script_id}")
def custom_signal(req: Request) -> Response:
    principal = _caller(req)
    return json_response(app().realtime.signal(principal, req.params["instrument_key"],
                                                  _script_id(req, principal), req.query))


@route("POST", "/scripts/{script_id}/series")
def series(req: Request) -> Response:
    principal = _caller(req)
    script_id, history = _script_id(req, principal), app().history
    history.precheck(principal, script_id, req.call_id)  # 404/403 before the body is read
    return json_response(history.series(principal, script_id, req.json_object(), req.call_id))


# ----------------------------------------------------------------- OpenAPI

_SCRIPT_ID_PARAM = {
    "name": "script_id", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$", "maxLength": 63},
    "description": "Script id: the platform-wide id (`<chosen>-<tenant tag>`, as every answer gives it), or, "
                   "for the caller's own tenant's scripts, the bare id chosen at creation.",
}
_CALL_ID_PARAM = {
    "name": "call_id", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
    "description": "The execute's call id (its X-Call-Id; `call_id` in its answer).",
}
_VERSION_PARAM = {
    "name": "version", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": "^([1-9][0-9]{0,8}|draft)$"},
    "description": "A published version number, or `draft` (owner only).",
}
_ERRORS = {
    "400": "Body is not a JSON object, not strict JSON, or nested more than 64 levels (`json_too_deep`).",
    "401": "Missing, malformed, expired or badly signed bearer token.",
    "403": "Tier without `custom_scripts`, not the owner, not entitled (under the script's current policy), "
           "over the tier's script cap, or listing without `marketplace_publish`.",
    "404": "Unknown script, or another tenant's private script (existence is not revealed).",
    "409": "Script id taken in the caller's own tenant, or nothing published yet.",
    "429": "Too many concurrent executes for the caller or their tenant (`too_many_concurrent_executes`); "
           "retry after `Retry-After` seconds. Nothing was started.",
    "502": "The script's function could not be reached or answered malformed data.",
    "413": f"Body over 1 MiB or source over {MAX_SOURCE_BYTES} bytes.",
    "422": "Invalid ids, schemas, syntax (line/column given), missing run(ctx), bad depends_on, cycles.",
    "503": "Storage (PostgreSQL, S3, Redis) temporarily unavailable, or this replica already runs its "
           "maximum of executes (`execute_capacity`); retry after `Retry-After` seconds.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _operation(op_id: str, summary: str, ok: dict[str, dict], *, params: list | None = None,
               body: str | None = None, errors: tuple[str, ...] = ("401", "403", "404", "422")) -> dict:
    responses = dict(ok)
    for status in (*errors, "503"):
        responses[status] = _json("ErrorBody", _ERRORS[status])
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


@functools.cache
def openapi() -> dict[str, Any]:
    from customscripts.realtime.service import SignalView, SubscribeBody, SubscriptionList, SubscriptionView
    from customscripts.series import SeriesBody, SeriesResponse

    _, defs = models_json_schema(
        [(m, "validation" if m in (DraftCreate, DraftUpdate, ExecuteBody, SubscribeBody, SeriesBody, DeprecateBody)
          else "serialization")
         for m in (DraftCreate, DraftUpdate, ScriptMeta, ScriptView, VersionView, PublishResult, VersionList,
                   Subscription, ErrorBody, ExecuteBody, ExecutionResponse, StoredExecution, SubscribeBody,
                   SubscriptionView, SubscriptionList, SignalView, SeriesBody, SeriesResponse, ScriptList,
                   DeprecateBody, Deprecation)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = defs.get("$defs", {})
    sid = [_SCRIPT_ID_PARAM]
    update = _operation("updateDraft", "Update the draft (owner only); given fields replace the draft's. A draft "
                        "that is (or stays) listed on the marketplace needs `marketplace_publish` (403).",
                        {"200": _json("ScriptMeta", "The updated draft.")}, params=sid, body="DraftUpdate",
                        errors=("400", "401", "403", "404", "413", "422"))
    paths = {
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1 document.",
                                                        "content": {"application/json": {"schema": {
                                                            "type": "object"}}}}}}},
        "/scripts": {"post": _operation(
            "createDraft", "Create a script with its first draft. A chosen `script_id` names the script in "
            "the caller's tenant only: its platform-wide id, in the answer, is the chosen id plus the tenant's "
            "tag, so the answer never depends on other tenants' ids. Listing it "
            "(`permissions.marketplace: true`) needs the `marketplace_publish` feature (403).",
            {"201": _json("ScriptMeta", "The draft's meta.json.")}, body="DraftCreate",
            errors=("400", "401", "403", "409", "413", "422"))},
        "/scripts/{script_id}": {
            "get": _operation("getScript", "Owner: the draft with source. Entitled users: the latest "
                              "published version's meta, never the source.",
                              {"200": _json("ScriptView", "Script metadata.")}, params=sid),
            "put": update,
            "patch": {**update, "operationId": "patchDraft"},
        },
        "/scripts/{script_id}/publish": {"post": _operation(
            "publish",
            "Freeze the draft into the next immutable numbered version. Publishing a draft whose code "
            "sha256 and metadata equal the latest version's creates nothing and answers 200 with that "
            "version and `unchanged: true`. Publishing a listed draft needs `marketplace_publish` (403). The "
            "latest version's permissions govern every version: publishing one without a user, or unlisted, "
            "revokes all older versions for them and for scripts depending on them.",
            {"201": _json("PublishResult", "A new version was published."),
             "200": _json("PublishResult", "Nothing changed since the latest version (`unchanged: true`).")},
            params=sid, errors=("401", "403", "404", "409", "413", "422"))},
        "/scripts/{script_id}/versions": {"get": _operation(
            "listVersions", "Published versions (all for the owner, usable ones for others).",
            {"200": _json("VersionList", "Versions in ascending order.")}, params=sid)},
        "/scripts/{script_id}/versions/{version}": {"get": _operation(
            "getVersion", "One version's meta (source only for the owner), its function URL and its image build.",
            {"200": _json("VersionView", "Version metadata.")}, params=[_SCRIPT_ID_PARAM, _VERSION_PARAM])},
        "/scripts/{script_id}/execute": {"post": _operation(
            "execute",
            "Run a published version once (the latest unless `version` is given) and answer in the "
            "indicator shape, as of `timestamp` (default now; a time after the server's now is 422 "
            "`timestamp_in_future`). Permissions and tier are checked first (403, nothing runs), then the "
            "dependency closure, then `params` against the version's input_schema (422), then the "
            "caller's and tenant's concurrent executes (429 with Retry-After; nothing runs). The answer is "
            "200 whenever the script ran; its `status` is ok, error, timeout, invalid_output or "
            "dependency_failed. A one-time execute never writes the script's history, latest value or "
            "signal stream (the realtime publish is the value of record); `store: true` keeps an ok output "
            "as this call's stored result, read back with GET /executions/{call_id}.",
            {"200": _json("ExecutionResponse", "The execution's status, output and metrics.")},
            params=sid, body="ExecuteBody", errors=("400", "401", "403", "404", "409", "422", "429", "502"))},
        "/executions/{call_id}": {"get": _operation(
            "storedExecution",
            "The result a one-time execute kept with `store: true`, to callers of the same tenant who may "
            "still use that script version; 404 for everyone else and for unknown call ids.",
            {"200": _json("StoredExecution", "The stored result.")}, params=[_CALL_ID_PARAM])},
        "/scripts/{script_id}/marketplace/subscribe": {"post": _operation(
            "subscribe", "Subscribe (from any tenant) to a marketplace-listed script; it then runs in the "
            "subscriber's tenant, without its source being visible.",
            {"201": _json("Subscription", "Subscribed."),
             "200": _json("Subscription", "Already subscribed.")},
            params=sid)},
    }
    paths.update(_realtime_paths(sid))
    paths.update(_history_paths(sid))
    paths.update(_author_paths(sid, paths["/scripts"]))
    paths.update(_function_url_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "customscripts registry", "version": "1.0.0",
                 "description": "Script registry: drafts, immutable published versions, marketplace."},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


def _function_url_paths() -> dict[str, Any]:
    """A published version's own function URL (`function_url` on its version): served by the OpenFaaS
    gateway, not this API, hence the path-level server."""
    from customscripts.config import settings

    server = [{"url": "{gateway}", "description": "The OpenFaaS gateway users reach.",
               "variables": {"gateway": {"default": settings().public_gateway_url}}}]
    name = {"name": "function_name", "in": "path", "required": True, "description": "The version's function "
            "(the last segment of its `function_url`).", "schema": {"type": "string",
                                                                  "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}
    run = _operation(
        "callFunctionUrl",
        "Run this one version with your own bearer token: the execute request body (its `version` may be "
        "omitted, or must be this function's), the same checks in the same order, statuses, answer and audit "
        "row as POST /scripts/{script_id}/execute. The function asks the registry (through gateway-fn, the "
        "only place it can reach) to authorise the call before any child starts. Answered by the function "
        "while the version is deployed (the gateway answers 404 for a function the budget has evicted; "
        "POST /scripts/{script_id}/execute deploys it again).",
        {"200": _json("ExecutionResponse", "The execution's status, output and metrics.")},
        params=[name], body="ExecuteBody", errors=("400", "401", "403", "404", "409", "422", "429", "502"))
    queued = {**run, "operationId": "callFunctionUrlAsync",
              "summary": "OpenFaaS asynchronous invocation: answered 202 at once; the gateway's queue runs the "
                         "call later and POSTs the body the synchronous call would have answered to "
                         "`X-Callback-Url`, with `X-Call-Id` and `X-Function-Status` (the HTTP status). The "
                         "platform adds nothing to the callback; the audit row is written as for a sync call.",
              "parameters": [name,
                             {"name": "X-Callback-Url", "in": "header", "required": False,
                              "schema": {"type": "string", "format": "uri"}},
                             {"name": "X-Call-Id", "in": "header", "required": False, "schema": {"type": "string"}}],
              "responses": {"202": {"description": "Queued."}}}
    return {"/function/{function_name}": {"servers": server, "post": run},
            "/async-function/{function_name}": {"servers": server, "post": queued}}


def _realtime_paths(sid: list[dict[str, Any]]) -> dict[str, Any]:
    sub_id = {"name": "subscription_id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,18}$"}, "description": "Subscription id."}
    instrument = {"name": "instrument_key", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:|-]{0,63}$"}}

    def q(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}

    deleted = _operation("unsubscribe", "Delete one of the caller's realtime subscriptions.",
                         {"204": {"description": "Deleted; nothing more is evaluated for it."}},
                         params=[*sid, sub_id])
    return {
        "/scripts/{script_id}/subscribe": {"post": _operation(
            "subscribeRealtime",
            "Evaluate a published version (the latest unless `version` is given; pinned) on every candle "
            "close of `instrument_key`/`timeframe`, with `params`. Checked like execute — tier, visibility "
            "(404), permission on the version and its whole dependency closure (403), params against the "
            "input_schema (422) — plus the tier's `max_subscriptions` (403 subscription_quota_exceeded) and "
            "the function budget (409). Dependencies are evaluated for the same events with params `{}`. "
            "Permissions are checked again on every evaluation: a lost entitlement makes that evaluation "
            "`denied` and nothing is published. Subscribing twice answers 200 with the existing one.",
            {"201": _json("SubscriptionView", "Subscribed."),
             "200": _json("SubscriptionView", "Already subscribed (claims snapshot refreshed).")},
            params=sid, body="SubscribeBody", errors=("400", "401", "403", "404", "409", "422"))},
        "/scripts/{script_id}/subscriptions/{subscription_id}": {"delete": deleted},
        "/subscriptions": {"get": _operation(
            "listSubscriptions", "The caller's realtime subscriptions, optionally for one script.",
            {"200": _json("SubscriptionList", "Subscriptions in creation order.")},
            params=[q("script_id", _SCRIPT_ID_PARAM["schema"], "Only this script's subscriptions.")],
            errors=("400", "401", "403", "422"))},
        "/signals/{instrument_key}/custom/{script_id}": {"get": _operation(
            "customSignal",
            "A custom script's latest realtime value, exactly like a built-in indicator (from Redis), for "
            "users entitled to the script, in the caller's own tenant only. `history=N` (or start/end) adds "
            "the stored history from TimescaleDB, columnar.",
            {"200": _json("SignalView", "Latest value (and history).")},
            params=[instrument, *sid,
                    q("timeframe", {"type": "string"}, "Candle timeframe, e.g. 1d.", required=True),
                    q("params", {"type": "string"}, "Params as a JSON object (hashed like the subscription)."),
                    q("params_hash", {"type": "string", "pattern": "^[0-9a-f]{1,64}$"}, "Or the params hash."),
                    q("history", {"type": "integer", "minimum": 1, "maximum": 5000}, "Also the last N outputs."),
                    q("start", {"type": "number"}, "History from (epoch s)."),
                    q("end", {"type": "number"}, "History until (epoch s).")],
            errors=("400", "401", "403", "404", "422"))},
    }


def _history_paths(sid: list[dict[str, Any]]) -> dict[str, Any]:
    return {"/scripts/{script_id}/series": {"post": _operation(
        "series",
        "The script's output at every bar end in [start, end] (end: at most now), each computed exactly as "
        "realtime would have computed it at that bar end (the bar visible from its end, dependencies "
        "evaluated for the same bar end first), in batches inside one sandboxed child per chunk. At most "
        "the tier's `max_series_bars` bars per request: `next_start` continues the range. Nothing is "
        "published (the script's history stays realtime's). Checks as execute (403, 404, 422, 429).",
        {"200": _json("SeriesResponse", "One output per bar end of this page.")},
        params=sid, body="SeriesBody", errors=("400", "401", "403", "404", "409", "422", "429", "502"))}}


def _author_paths(sid: list[dict[str, Any]], scripts_path: dict[str, Any]) -> dict[str, Any]:
    """GET /scripts and version deprecation (issue 16)."""
    def q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    flag = {"type": "string", "enum": ["true", "false"]}
    version = [*sid, {"name": "version", "in": "path", "required": True,
                      "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"}, "description": "Version."}]
    listing = _operation(
        "listScripts", "The scripts the caller may see, in id order: their own (drafts included), those shared "
        "with them inside their tenant (teams, orgs, users), and marketplace scripts they are subscribed to. "
        "Another tenant's private script never appears. Pages may be shorter than `limit`; continue with "
        "`next_cursor` until it is null.",
        {"200": _json("ScriptList", "One page of scripts.")},
        params=[q("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size (default 50)."),
                q("cursor", _SCRIPT_ID_PARAM["schema"], "`next_cursor` of the previous page."),
                q("owner", {"type": "string", "maxLength": 128}, "Only this owner's scripts."),
                q("mine", flag, "Only the caller's own scripts."),
                q("status", {"type": "string", "enum": ["draft", "published", "deprecated"]}, "Script state."),
                q("runtime_mode", {"type": "string", "enum": ["onetime", "realtime"]}, "Runtime mode."),
                q("marketplace", flag, "Only listed (true) or unlisted (false) scripts."),
                q("q", {"type": "string", "maxLength": 100}, "Text in the name or id.")],
        errors=("400", "401", "403", "422"))
    deprecate = _operation(
        "deprecateVersion", "Deprecate a published version (owner): new subscriptions to it answer 409 "
        "`version_deprecated`; running subscriptions and executes go on; listings show it.",
        {"200": _json("Deprecation", "The version's deprecation.")}, params=version,
        errors=("400", "401", "403", "404", "422"))
    deprecate["requestBody"] = {"required": False,
                                "content": {"application/json": {"schema": _ref("DeprecateBody")}}}
    undo = _operation("undeprecateVersion", "Withdraw a version's deprecation (owner).",
                      {"200": _json("Deprecation", "The version, no longer deprecated.")}, params=version)
    return {"/scripts": {**scripts_path, "get": listing},
            "/scripts/{script_id}/versions/{version}/deprecate": {"post": deprecate},
            "/scripts/{script_id}/versions/{version}/deprecation": {"delete": undo}}
