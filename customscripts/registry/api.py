"""registry-fn's HTTP API: routes and request parsing (the OpenAPI document that describes them is
registry/openapi.py).

The handler in `registry-fn/handler.py` only calls `handle()`. Every route authenticates first
(401), then applies the tier gate (403) before reading the body, so a caller without the
`custom_scripts` feature causes no work at all. Errors are `{"error": {"code", "message", ...}}`.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from pydantic import BaseModel

from customscripts import ids, logs
from customscripts.app import app
from customscripts.auth import Principal, principal_from_request
from customscripts.errors import Invalid, Malformed, Unauthenticated, Unavailable
from customscripts.http import Context, Event, Request, Response, RouteHandler, Router, json_response
from customscripts.inputs import check_query, parse_body
from customscripts.permissions import tier_of
from customscripts.registry.models import (
    DeprecateBody,
    DraftCreate,
    DraftUpdate,
)
from customscripts.registry.openapi import openapi

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
            raise Unavailable("registry storage temporarily unavailable", code="backend_unavailable",
                              retry_after_s=1) from None

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
        raise Invalid(f"{name} must be true or false", code="invalid_parameter")
    return raw == "true"


@route("GET", "/scripts")
def list_scripts(req: Request) -> Response:
    """Own, shared and entitled marketplace scripts; filters and a cursor (registry/service.py)."""
    principal = _caller(req)
    check_query(req.query, _LIST_FILTERS)
    q = req.query
    raw_limit = q.get("limit", "50")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= 200):
        raise Invalid("limit must be an integer from 1 to 200", code="invalid_parameter")
    choices = {"status": ("draft", "published", "deprecated"), "runtime_mode": ("onetime", "realtime")}
    for name, allowed in choices.items():
        if q.get(name) is not None and q.get(name) not in allowed:
            raise Invalid(f"{name} must be one of {', '.join(allowed)}", code="invalid_parameter")
    text = q.get("q")
    if text is not None and (len(text) > 100 or not text.isprintable()):
        raise Invalid("q must be printable text of at most 100 characters", code="invalid_parameter")
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
        raise Malformed("body must be the execute request's JSON object", code="invalid_json")
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
        raise Unauthenticated("the proof is for another function", code="invalid_function_request")
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
