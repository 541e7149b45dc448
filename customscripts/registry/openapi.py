"""The OpenAPI 3.1 document of registry-fn's API (GET /openapi.json), built once from the request and
answer models the routes use, so the document cannot drift from what the API accepts and returns.
`tests/integration/test_registry_api.py` checks it lists exactly the routes."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import models_json_schema

from customscripts.execution import ExecuteBody, ExecutionResponse, StoredExecution
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
