"""Running published versions: the one path from a principal's request to a function's result.

`Invoker` deploys a version's function within the function budget and calls it with fresh, signed,
short-lived tokens; one-time executes (`execute`) and the realtime scheduler both go through it.
Order for a one-time execute: body and as-of time (422; no time after the server's now),
permissions and tier (403, nothing started), dependency closure, params against `input_schema`
(422), a concurrency slot (429/503, registry/concurrency.py), tokens, invoke, validate, store,
audit. Every attempt — denied and throttled ones included — leaves an audit row, durable before the
attempt is answered (registry/audit.py group-commits the rows of concurrent executes); when it cannot
be recorded the answer is 503 `audit_unavailable`. On a function URL the row is durable before
`complete` answers the function, so before the user's answer too.

History: a one-time execute never writes `script_outputs`, the Redis latest value or the signal
stream. Those belong to the realtime publisher, the value of record for its event; a one-time
caller picks its own as-of time and must not be able to write an event's value before it happens.
`store: true` keeps the ok result in `onetime_results` under the tenant and call id, readable by
the tenant with GET /executions/{call_id}.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import jsonschema
from pydantic import BaseModel, Field
from referencing.exceptions import Unresolvable

from customscripts import ids, logs, metrics
from customscripts.auth import Principal
from customscripts.config import Settings, settings
from customscripts.errors import Conflict, DomainError, Forbidden, Invalid, NotFound, Unauthenticated, UpstreamFailed
from customscripts.faas.budget import FunctionBudget
from customscripts.faas.build import deployment, render_context
from customscripts.faas.client import AnswerLost, FaasError, FunctionNotFound, NotListening, OpenFaaSClient
from customscripts.faas.naming import function_name
from customscripts.gateway.tokens import mint_execution_token
from customscripts.http import MAX_JSON_DEPTH, json_depth
from customscripts.inputs import parse_body
from customscripts.outputs import OnetimeResult, OnetimeResults, params_hash
from customscripts.permissions import tier_of
from customscripts.registry.concurrency import ExecuteSlots, Lease
from customscripts.registry.models import EvaluationTarget, Number, ScriptMeta
from customscripts.registry.service import RegistryService
from customscripts.retry import RetryPolicy
from customscripts.sandbox.invocation import mint_invocation_token, open_grant, seal_grant

log = logs.get("customscripts.execution")

STATUSES = ("ok", "error", "timeout", "invalid_output", "dependency_failed", "denied")
ENDPOINT_RETRY_S = 30.0
# A function gone between the budget's check and the call (evicted by another replica, the provider
# restarted) is redeployed and called once more, at once: nothing to wait for.
REDEPLOY_RETRY = RetryPolicy(attempts=2, backoff_s=0.0, max_backoff_s=0.0, jitter=False)


class ExecuteBody(EvaluationTarget):
    """POST /scripts/{id}/execute body."""

    timestamp: Annotated[float | None, Number] = Field(default=None, ge=0, le=4_102_444_800, allow_inf_nan=False,
                                    description="As-of epoch seconds, not after the server's now (422 "
                                                "`timestamp_in_future`); default now. No data after it is "
                                                "visible.")
    store: bool = Field(default=False, description="Also keep an ok output as this call's stored result "
                                                   "(GET /executions/{call_id}); never the script's history.")


class IndicatorOutput(BaseModel):
    value: Any
    timestamp: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class ExecutionResponse(BaseModel):
    """What execute answers: the indicator-shaped output plus the execution's status and metrics."""

    script_id: str
    version: int
    call_id: str = Field(description="This call's id (X-Call-Id); a stored result is read back under it.")
    status: str = Field(description="ok | error | timeout | invalid_output | dependency_failed")
    instrument_key: str
    timeframe: str
    params_hash: str
    output: IndicatorOutput | None
    error: dict[str, Any] | None
    stored: bool = Field(description="The ok output was kept as this call's stored result.")
    metrics: dict[str, float | None]
    stdout: str
    stderr: str


class StoredExecution(BaseModel):
    """GET /executions/{call_id}: a one-time execute's stored result, inside the caller's tenant."""

    call_id: str
    script_id: str
    version: int
    user_id: str
    instrument_key: str
    timeframe: str
    params_hash: str
    output: IndicatorOutput


@dataclass(frozen=True)
class ExecuteGrant:
    """A one-time execute that passed every check, between its authorisation and its answer (on a
    version's function URL it travels, signed, from authorise to complete: faas/function_url.py)."""

    script_id: str
    version: int
    call_id: str
    user_id: str
    tenant: str
    tier: str
    instrument_key: str
    timeframe: str
    params: dict[str, Any]
    params_hash: str
    as_of: float
    store: bool
    token: str = ""  # the execution token its reads are made with


@dataclass(frozen=True)
class Scope:
    """Who an evaluation runs for: outputs and reads belong to this tenant."""

    user_id: str
    tenant: str
    tier: str


# json.dumps with options builds an encoder per call; these are built once (the realtime path calls
# them per evaluation and per invocation). Same output as the json.dumps calls they stand for.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_BODY_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def canonical_hash(value: Any) -> str:
    """sha256 of canonical JSON, shortened (audit rows). Values come bounded in depth (parse_json,
    check_result); anything unencodable still hashes, by its repr, rather than failing the request."""
    try:
        text = _CANONICAL_JSON.encode(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(type(value)) + ":unencodable"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Invoker:
    """Deploy-on-demand within the budget, then invoke with an invocation and an execution token."""

    def __init__(self, registry: RegistryService, client: OpenFaaSClient, budget: FunctionBudget,
                 cfg: Settings | None = None) -> None:
        self.cfg = cfg or settings()
        self.registry = registry
        self.client = client
        self.budget = budget
        self._endpoints: dict[str, tuple[str | None, float]] = {}  # function -> (own address, retry at)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - published versions are immutable; one Invoker per process
    def version(self, script_id: str, version: int) -> tuple[ScriptMeta, str]:
        """meta.json and source of a published version (cached: published objects never change)."""
        meta, source = self.registry.load_version(script_id, version)
        if meta.status == "draft":
            raise Conflict(f"{script_id} has no published version {version}", code="not_published")
        return meta, source

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - as version(): immutable, one Invoker per process
    def params_validator(self, script_id: str, version: int) -> jsonschema.protocols.Validator:
        """The version's input_schema validator, its schema checked once (validate() re-checks per call)."""
        schema = self.version(script_id, version)[0].input_schema or {}
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return cls(schema)

    def check_params(self, script_id: str, version: int, params: dict[str, Any], *,
                     problem: str = "params do not match the script's input_schema",
                     code: str = "invalid_params", details: dict[str, Any] | None = None) -> None:
        """params against the version's input_schema: the one check for execute, series and subscribe
        (422 `code`, `problem` first in the message). A schema that recurses without bound on these
        params, or whose $ref does not resolve, is the caller's 422 too, never a 500."""
        details = details or {}
        try:
            error = jsonschema.exceptions.best_match(self.params_validator(script_id, version).iter_errors(params))
        except RecursionError:
            raise Invalid(f"{problem}: the input_schema recurses without end on them", code=code,
                          details=details or None) from None
        except Unresolvable as exc:
            raise Invalid(f"{problem}: the input_schema has an unresolvable $ref: {str(exc)[:200]}",
                          code=code, details=details or None) from None
        if error is not None:  # what jsonschema.validate would raise, without re-checking the schema
            raise Invalid(f"{problem}: {error.message}", code=code,
                          details={**details, "path": list(error.absolute_path)})

    def _deploy(self, script_id: str, version: int) -> None:
        meta, source = self.version(script_id, version)
        built = render_context(script_id, version, source, meta.model_dump(mode="json"))
        self.client.deploy(deployment(script_id, version, owner_id=meta.owner_id, tenant=meta.tenant,
                                      code_hash=built.code_sha256, tier=meta.tier or "pro",
                                      context_hash=built.context_sha256))

    def function_for(self, script_id: str, version: int, tenant: str) -> str:
        """The version's function, deployed and charged to `tenant`'s share of the function budget; 503
        `building` until its image exists (faas/buildqueue.py; asked once per version when built)."""
        builds = getattr(self.registry, "builds", None)
        if builds is not None:
            builds.require_built(script_id, version)
        return self.budget.ensure_deployed(tenant, script_id, version, lambda: self._deploy(script_id, version))

    def endpoint(self, name: str) -> str | None:
        """The function's own address (`OpenFaaSClient.function_url`), remembered; None: the gateway.
        An unknown address is asked for again after ENDPOINT_RETRY_S."""
        known = self._endpoints.get(name)
        if known is not None and (known[0] is not None or time.monotonic() < known[1]):
            return known[0]
        url = self.client.function_url(name)
        self._endpoints[name] = (url, time.monotonic() + ENDPOINT_RETRY_S)
        return url

    def invoke(self, script_id: str, version: int, payload: dict[str, Any], scope: Scope,
               call_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """POST the payload (one execution or {"items": [...]}) to the version's function: at its own
        address when it is running there (one hop less), else through the gateway, which starts it.
        `timeout`: seconds to wait for the answer (default: the client's invoke timeout)."""
        body = _BODY_JSON.encode(payload)
        for attempt in range(1, REDEPLOY_RETRY.attempts + 1):
            name = self.function_for(script_id, version, scope.tenant)
            token = mint_invocation_token(name, {"user": scope.user_id, "tenant": scope.tenant})
            headers = {"Authorization": f"Bearer {token}", "X-Call-Id": call_id,
                       "Content-Type": "application/json"}
            result = None
            url = self.endpoint(name)
            try:
                if url is not None:
                    try:
                        result = self.client.invoke_at(url, body, headers=headers, timeout=timeout)
                    except (NotListening, AnswerLost):  # not running there (yet, or any more)
                        # also when its answer was lost (it was being stopped just then): a function
                        # only computes and answers, so sending the call again is safe
                        self._endpoints.pop(name, None)
                if result is None:
                    result = self.client.invoke(name, body, headers=headers, timeout=timeout)
            except FunctionNotFound:
                self.budget.forget(name)  # evicted by another replica: redeploy once
                self._endpoints.pop(name, None)
                if REDEPLOY_RETRY.gives_up(attempt):
                    raise UpstreamFailed(f"function {name} disappeared twice while invoking",
                                         code="function_gone") from None
                continue
            except FaasError as exc:
                raise UpstreamFailed(f"function {name} could not be reached: {exc}", code="function_unreachable") \
                    from None
            if result.status != 200:
                raise UpstreamFailed(f"function {name} answered {result.status}: {result.body[:300]!r}",
                                     code="function_error")
            try:
                return result.json()
            except ValueError:
                raise UpstreamFailed(f"function {name} answered with invalid JSON", code="function_error") from None
        raise AssertionError("unreachable")

    def execution_token(self, script_id: str, version: int, scope: Scope, as_of: float,
                        closure: Sequence[tuple[str, int]], call_id: str, *, realtime: bool = False) -> str:
        """`realtime`: minted by the scheduler; the gateway meters it against the tier's realtime budget."""
        deps = [f"{sid}@{ver}" for sid, ver in closure if (sid, ver) != (script_id, version)]
        return mint_execution_token(user=scope.user_id, tenant=scope.tenant, script_id=script_id, version=version,
                                    deps=deps, as_of=as_of, tier=scope.tier, call_id=call_id, realtime=realtime)


def check_result(raw: Any) -> dict[str, Any]:
    """The function's result for one item, checked for shape and depth; a malformed one is a 502."""
    if not isinstance(raw, dict) or raw.get("status") not in STATUSES or json_depth(raw) > MAX_JSON_DEPTH:
        raise UpstreamFailed("script function returned a malformed result", code="function_error")
    if raw["status"] == "ok":
        output = raw.get("output")
        if not isinstance(output, dict) or not {"value", "timestamp"} <= set(output):
            raise UpstreamFailed("script function returned ok without an output", code="function_error")
    return raw


class Executor:
    """One-time executions (`POST /scripts/{id}/execute`) and their stored results."""

    def __init__(self, invoker: Invoker, results: OnetimeResults, slots: ExecuteSlots) -> None:
        self.invoker = invoker
        self.registry = invoker.registry
        self.cfg = invoker.cfg
        self.results = results
        self.slots = slots

    def execute(self, principal: Principal, script_id: str, raw_body: dict[str, Any], call_id: str) -> dict:
        """POST /scripts/{id}/execute: authorise, invoke the version's function, answer and audit."""
        grant, lease = self.authorise(principal, script_id, raw_body, call_id)
        try:
            with self.slots.in_process():
                payload = {"instrument_key": grant.instrument_key, "timeframe": grant.timeframe,
                           "params": grant.params, "timestamp": grant.as_of, "execution_token": grant.token}
                scope = Scope(grant.user_id, grant.tenant, grant.tier)
                result = check_result(self.invoker.invoke(script_id, grant.version, payload, scope, call_id))
        except DomainError as exc:
            self.refused(grant, exc)
            raise
        finally:
            self.slots.release(lease)
        return self.finish(grant, result)

    def authorise(self, principal: Principal, script_id: str, raw_body: dict[str, Any],
                  call_id: str) -> tuple[ExecuteGrant, Lease]:
        """Everything before a one-time execute runs, the same for the registry's route and a version's
        function URL: body and as-of time (422), permissions and tier (403), dependency closure, params
        (422), a concurrency lease (429/503), the execution token. Denied and throttled attempts are
        audited here; the lease is the caller's to release (it also expires on its own)."""
        received = time.time()  # the server's now: no as-of time after it
        ids.script_id(script_id)
        body = parse_body(ExecuteBody, raw_body, "execute")
        if body.timestamp is not None and body.timestamp > received:
            raise Invalid("timestamp is in the future: a one-time execute runs as of now or earlier",
                          code="timestamp_in_future", details={"timestamp": body.timestamp, "now": received})
        if body.store:
            ids.call_id(call_id)  # the stored result's key
        instrument, timeframe = ids.instrument_key(body.instrument_key), ids.timeframe(body.timeframe)
        row = None
        if body.version is None:
            row = self.registry.visible_script(principal, script_id, cached=True)
        version = body.version or self.registry.latest_published(row)
        grant = ExecuteGrant(script_id=script_id, version=version, call_id=call_id, user_id=principal.user_id,
                             tenant=principal.tenant, tier=principal.tier, instrument_key=instrument,
                             timeframe=timeframe, params=body.params, params_hash=params_hash(body.params),
                             as_of=body.timestamp if body.timestamp is not None else received, store=body.store)
        try:
            closure = self.registry.check_execution(principal, script_id, version, row)
        except Forbidden as exc:
            self._audit(grant, status="denied", detail=exc.message[:500])
            raise
        self.invoker.check_params(script_id, version, body.params)
        try:
            lease = self.slots.acquire(principal, tier_of(principal, self.cfg), self._lease_s(script_id, version),
                                       call_id)
        except DomainError as exc:
            self.refused(grant, exc)
            raise
        scope = Scope(principal.user_id, principal.tenant, principal.tier)
        token = self.invoker.execution_token(script_id, version, scope, grant.as_of, closure, call_id)
        return dataclasses.replace(grant, token=token), lease

    def _lease_s(self, script_id: str, version: int) -> float:
        """How long an execute's lease (and a function URL's grant) lasts: its wall timeout plus slack."""
        return wall_timeout_s(self.invoker.version(script_id, version)[0], self.cfg) + self.cfg.execute_lease_slack_s

    def refused(self, grant: ExecuteGrant, exc: DomainError) -> None:
        """Audit an authorised execute that failed before it had a result (limits, the function)."""
        self._audit(grant, status="throttled" if exc.code in THROTTLED else "error", detail=exc.message[:500])

    def finish(self, grant: ExecuteGrant, result: dict[str, Any]) -> dict[str, Any]:
        """The answer to an execute that ran: its stored result when asked, its audit row, the response."""
        output = result.get("output")
        stored = False
        if result["status"] == "ok" and grant.store:
            stored = self.results.write(OnetimeResult(
                tenant=grant.tenant, call_id=grant.call_id, user_id=grant.user_id, script_id=grant.script_id,
                version=grant.version, instrument_key=grant.instrument_key, timeframe=grant.timeframe,
                params_hash=grant.params_hash, as_of=grant.as_of, value=output["value"],
                metadata=output.get("metadata") or {}))
        self._audit(grant, status=result["status"], output_hash=canonical_hash(output) if output else None,
                    duration_ms=result.get("duration_ms"), cpu_ms=result.get("cpu_ms"),
                    memory_mb=result.get("memory_mb"), detail=error_detail(result.get("error")))
        logs.event(log, "executed", script_id=grant.script_id, version=grant.version, status=result["status"],
                   duration_ms=result.get("duration_ms"))
        return {
            "script_id": grant.script_id, "version": grant.version, "call_id": grant.call_id,
            "status": result["status"], "instrument_key": grant.instrument_key, "timeframe": grant.timeframe,
            "params_hash": grant.params_hash, "output": output, "error": result.get("error"), "stored": stored,
            "metrics": {k: result.get(k) for k in ("duration_ms", "cpu_ms", "memory_mb")},
            "stdout": result.get("stdout", ""), "stderr": result.get("stderr", ""),
        }

    # ------------------------------------------------------------ a version's function URL

    def authorise_function_call(self, principal: Principal, function: str, script_id: str, version: Any,
                                raw_body: dict[str, Any], call_id: str) -> dict[str, Any]:
        """A user's call on the function URL of `script_id`@`version` (the function `function` asked,
        proven by faas/script_function.py): the same checks as the registry's execute; answers the
        execution token and the grant the function hands back to `complete_function_call`."""
        number = ids.version(version)
        if function_name(script_id, number) != function:
            raise Forbidden(f"function {function} does not serve {script_id}@{number}", code="wrong_function")
        if raw_body.get("version") not in (None, number):
            raise Invalid(f"this function URL serves version {number} of {script_id} only",
                          code="wrong_version", details={"version": number})
        grant, lease = self.authorise(principal, script_id, {**raw_body, "version": number}, call_id)
        claims = {**dataclasses.asdict(grant), "token": "", "fn": function,
                  "lease": {"member": lease.member, "keys": list(lease.keys)}}
        return {"execution_token": grant.token, "grant": seal_grant(claims, self._lease_s(script_id, number)),
                "execution": {"instrument_key": grant.instrument_key, "timeframe": grant.timeframe,
                              "params": grant.params, "timestamp": grant.as_of}}

    def complete_function_call(self, function: str, call_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """The function's result for a call `authorise_function_call` granted: the same stored result,
        audit row and response as the registry's execute; the lease goes back."""
        claims = open_grant(body.get("grant"))
        if claims.get("fn") != function or claims.get("call_id") != call_id:
            raise Unauthenticated("the grant is for another call", code="invalid_grant")
        lease_claims = claims.pop("lease")
        claims.pop("fn")
        claims.pop("exp")
        grant = ExecuteGrant(**claims)
        try:
            failure = body.get("failure")
            if failure is not None:  # the function could not run it (sandbox unavailable, ...)
                self._audit(grant, status="error", detail=str(failure)[:500])
                return {"refused": True}
            try:
                result = check_result(body.get("result"))
            except DomainError as exc:
                self.refused(grant, exc)
                raise
            return self.finish(grant, result)
        finally:
            self.slots.release(Lease(str(lease_claims["member"]), tuple(lease_claims["keys"])))

    def _audit(self, grant: ExecuteGrant, *, status: str, **fields: Any) -> None:
        """The attempt's audit row, committed durably before the caller answers (Catalog.audit)."""
        metrics.observe_execute(grant.tier, status=status, **fields)  # every attempt, by status and tier
        self.registry.catalog.audit(action="execute", script_id=grant.script_id, version=grant.version,
                                    user_id=grant.user_id, tenant=grant.tenant, status=status, call_id=grant.call_id,
                                    params_hash=grant.params_hash, **fields)

    def stored(self, principal: Principal, call_id: str) -> dict[str, Any]:
        """A stored one-time result, for callers of its tenant who may still use its script version;
        404 for anyone else, exactly as for an unknown call id."""
        found = self.results.get(principal.tenant, ids.call_id(call_id))
        missing = NotFound(f"no stored execution {call_id}", code="execution_not_found")
        if found is None:
            raise missing
        try:
            self.registry.check_execution(principal, found.script_id, found.version)
        except (Forbidden, NotFound):
            raise missing from None
        return {"call_id": found.call_id, "script_id": found.script_id, "version": found.version,
                "user_id": found.user_id, "instrument_key": found.instrument_key, "timeframe": found.timeframe,
                "params_hash": found.params_hash,
                "output": {"value": found.value, "timestamp": found.as_of, "metadata": found.metadata}}


# Refusals of the concurrency limits (registry/concurrency.py): audited as `throttled`.
THROTTLED = frozenset({"too_many_concurrent_executes", "execute_capacity", "concurrency_unavailable"})


def wall_timeout_s(meta: ScriptMeta, cfg: Settings) -> float:
    """A version's wall timeout: its own limit, else its owner's tier's (what its function enforces)."""
    if meta.limits is not None and meta.limits.timeout_ms:
        return meta.limits.timeout_ms / 1000
    tier = cfg.tier(meta.tier or "pro")
    return (tier.timeout_ms if tier is not None else max(t.timeout_ms for t in cfg.tiers.values())) / 1000


def error_detail(error: dict[str, Any] | None) -> str | None:
    """An execution error as the audit row's one-line detail."""
    if not error:
        return None
    return f"{error.get('type', '')}: {error.get('message', '')}"[:500]
