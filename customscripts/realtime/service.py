"""Realtime control plane behind registry-fn: subscribe, unsubscribe, list, and read signals.

Subscribe runs the same checks as a one-time execute, in the same order — tier gate, visibility
(404), permission on the version and on its whole dependency closure (403), params against the
input_schema (422) — plus the tier's `max_subscriptions` cap (403) and the function budget (409):
a subscription pins the functions of its version and of every dependency, all charged to the
subscriber's tenant (marketplace scripts included), which may pin at most its share of the budget
(`tenant_function_share_full`); all tenants together pin at most `function_pin_limit`
(`function_budget_full`), so one-time executes always find a slot (customscripts/faas/budget.py).
The scheduler checks permissions again on every evaluation, with the subscriber's claims as of
subscribing, so entitlement changes take effect on the next event.

Dependencies of a subscribed script are evaluated for the same events with default params `{}`
(the params a dependent reads with `get_script_output(script_id)`); they must accept `{}`.

A new subscription is backfilled (`backfill: N`, default the tier's `default_backfill`): its outputs
at the last N bar ends are published before subscribe answers, dependencies first, so
`GET /signals/...?history=N` answers at once (customscripts/series.py).

`GET /signals/{instrument_key}/custom/{script_id}` answers like a built-in indicator from Redis,
only within the caller's tenant and only to users entitled to the script.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any

import redis
from pydantic import BaseModel, Field

from customscripts import ids
from customscripts.auth import Principal
from customscripts.config import Settings, settings
from customscripts.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Unavailable,
)
from customscripts.execution import Invoker
from customscripts.faas.naming import function_name
from customscripts.inputs import check_query, int_param, parse_body, time_param
from customscripts.outputs import MAX_HISTORY, OutputStore, params_hash, params_hash_from_query
from customscripts.permissions import tier_of
from customscripts.realtime.publisher import latest_key
from customscripts.realtime.subscriptions import (
    PinLimitReached,
    QuotaExceeded,
    Subscription,
    SubscriptionStore,
    TenantShareExceeded,
    principal_snapshot,
)
from customscripts.registry.models import EvaluationTarget, Number
from customscripts.registry.service import RegistryService
from customscripts.series import History


class SubscribeBody(EvaluationTarget):
    """POST /scripts/{id}/subscribe body."""

    version: Annotated[int | None, Number] = Field(default=None, ge=1, le=999_999_999,
                                description="Published version; default the latest at subscribe time (pinned).")
    backfill: Annotated[int | None, Number] = Field(default=None, ge=0, le=1_000_000,
                                 description="Publish the outputs at the last N bar ends before now first, so the "
                                             "history is there at once (default: the tier's `default_backfill` "
                                             "for a new subscription, none for an existing one; at most the "
                                             "tier's `max_backfill`, else 422).")


class SubscriptionView(BaseModel):
    id: int
    tenant: str
    user_id: str
    script_id: str
    version: int
    instrument_key: str
    timeframe: str
    params: dict[str, Any]
    params_hash: str
    created: bool | None = None
    dependencies: list[str] | None = Field(default=None, description="Evaluated for the same events, params {}.")
    backfill: dict[str, Any] | None = Field(default=None, description="What the backfill evaluated and published "
                                                                      "(bars, published, statuses, from, to).")


class SubscriptionList(BaseModel):
    subscriptions: list[SubscriptionView]


class SignalView(BaseModel):
    """A custom script's latest value in the built-in indicator shape, plus optional history."""

    instrument_key: str
    timeframe: str
    indicator: str
    script_id: str
    params_hash: str
    value: Any
    timestamp: float
    metadata: dict[str, Any]
    history: dict[str, list[Any]] | None = None


class RealtimeService:
    def __init__(self, registry: RegistryService, store: SubscriptionStore, outputs: OutputStore,
                 redis_client: redis.Redis, cfg: Settings | None = None, *, invoker: Invoker,
                 history: History) -> None:
        self.cfg = cfg or settings()
        self.registry = registry
        self.invoker = invoker  # versions' meta.json (cached) and their params check
        self.history = history  # backfill on subscribe
        self.store = store
        self.outputs = outputs
        self.redis = redis_client

    # ----------------------------------------------------------------- subscriptions

    def subscribe(self, principal: Principal, script_id: str, raw_body: Mapping[str, Any],
                  call_id: str | None = None) -> dict[str, Any]:
        tier = tier_of(principal, self.cfg)
        ids.script_id(script_id)
        body = parse_body(SubscribeBody, raw_body, "subscribe")
        instrument, timeframe = ids.instrument_key(body.instrument_key), ids.timeframe(body.timeframe)
        if body.backfill is not None and body.backfill > tier.max_backfill:
            raise Invalid(f"tier {tier.name!r} backfills at most {tier.max_backfill} outputs",
                          code="backfill_too_large", details={"max_backfill": tier.max_backfill})
        version = body.version or self.registry.latest_published(self.registry.visible_script(principal, script_id))
        audit = functools.partial(self.registry.catalog.audit, action="subscribe_realtime", script_id=script_id,
                                  version=version, user_id=principal.user_id, tenant=principal.tenant,
                                  call_id=call_id, params_hash=params_hash(body.params))
        try:
            closure = self.registry.check_execution(principal, script_id, version)
        except Forbidden as exc:
            audit(status="denied", detail=exc.message[:500])
            raise
        self._check_params(script_id, version, body.params, closure)
        self.registry.check_subscribable(script_id, version)
        functions = sorted({function_name(sid, ver) for sid, ver in closure})
        try:
            sub, created = self.store.add(
                tenant=principal.tenant, user_id=principal.user_id, script_id=script_id, version=version,
                instrument_key=instrument, timeframe=timeframe, params=body.params,
                principal=principal_snapshot(principal), max_for_user=tier.max_subscriptions,
                functions=functions, tenant_share=self.cfg.function_tenant_share,
                pin_limit=self.cfg.function_pin_limit)
        except QuotaExceeded as exc:
            audit(status="denied", detail="subscription quota exceeded")
            raise Forbidden(f"tier {tier.name!r} allows at most {tier.max_subscriptions} subscriptions",
                            code="subscription_quota_exceeded",
                            details={"max_subscriptions": tier.max_subscriptions, "current": exc.count}) from None
        except TenantShareExceeded as exc:
            audit(status="denied", detail="tenant function share full")
            raise Conflict(f"tenant {principal.tenant!r} may pin at most {exc.share} script functions "
                           f"(its share of the function budget) and already pins {exc.pinned}; this "
                           f"subscription needs {exc.new} more (its version and dependencies). "
                           "Unsubscribe from some first", code="tenant_function_share_full",
                           details={"tenant_function_share": exc.share, "pinned": exc.pinned,
                                    "needed": exc.new}) from None
        except PinLimitReached as exc:
            audit(status="denied", detail="function budget full")
            raise Conflict(f"the function budget ({self.cfg.function_budget}) has no more room for versions "
                           "with live subscriptions", code="function_budget_full",
                           details={"function_budget": self.cfg.function_budget, "pin_limit": exc.limit,
                                    "pinned": exc.pinned}) from None
        if created:
            audit(status="ok")
        deps = [f"{sid}@{ver}" for sid, ver in closure[:-1]]
        answer = {**sub.to_dict(), "created": created, "dependencies": deps}
        count = body.backfill if body.backfill is not None else (tier.default_backfill if created else 0)
        if count:
            # after the row exists: live events from now on are the scheduler's, and an event both
            # reach is published once (customscripts/series.py)
            try:
                answer["backfill"] = self.history.backfill(sub, principal, count,
                                                                call_id or uuid.uuid4().hex[:16])
            except DomainError as exc:  # e.g. 429 at the caller's concurrent executes: the subscription
                # stands (live events run); subscribing again with `backfill` fills it later
                answer["backfill"] = {"requested": count, "bars": 0, "published": 0,
                                      "error": {"code": exc.code, "message": exc.message}}
        return answer

    def unsubscribe(self, principal: Principal, script_id: str, subscription_id: str,
                    call_id: str | None = None) -> None:
        tier_of(principal, self.cfg)
        ids.script_id(script_id)
        try:
            number = int(subscription_id)
        except ValueError:
            raise Invalid("subscription id must be an integer", code="invalid_subscription_id") from None
        if not 1 <= number < 2**63 or not self.store.remove(principal.tenant, principal.user_id, number, script_id):
            raise NotFound(f"subscription {subscription_id} not found", code="subscription_not_found")
        self.registry.catalog.audit(action="unsubscribe_realtime", script_id=script_id, version=None,
                                    user_id=principal.user_id, tenant=principal.tenant, status="ok",
                                    call_id=call_id, detail=f"subscription {number}")

    def list(self, principal: Principal, script_id: str | None = None) -> list[dict[str, Any]]:
        tier_of(principal, self.cfg)
        if script_id:
            ids.script_id(script_id)
        return [s.to_dict() for s in self.store.for_user(principal.tenant, principal.user_id, script_id)]

    def _check_params(self, script_id: str, version: int, params: dict[str, Any],
                      closure: list[tuple[str, int]]) -> None:
        """The subscription's params, and every dependency's: realtime evaluates them with params {}."""
        self.invoker.check_params(script_id, version, params)
        for sid, ver in closure[:-1]:
            self.invoker.check_params(sid, ver, {}, code="invalid_dependency_params",
                                      problem=f"dependency {sid}@{ver} is evaluated with params {{}} in realtime, "
                                              "which its input_schema rejects",
                                      details={"dependency": f"{sid}@{ver}"})

    # ----------------------------------------------------------------- signals

    def signal(self, principal: Principal, instrument_key: str, script_id: str,
               query: Mapping[str, str]) -> dict[str, Any]:
        tier_of(principal, self.cfg)
        instrument = ids.instrument_key(instrument_key)
        self.registry.list_versions(principal, script_id)  # 404 invisible, 403 not entitled to any version
        check_query(query, ("timeframe", "params", "params_hash", "history", "start", "end"))
        timeframe = ids.timeframe(query.get("timeframe") or "")
        phash = params_hash_from_query(query)
        key = latest_key(principal.tenant, instrument, timeframe, script_id, phash)
        try:
            raw = self.redis.hget(key, "payload")
        except redis.RedisError:
            raise Unavailable("signal cache temporarily unavailable", code="cache_unavailable",
                              retry_after_s=1) from None
        if raw is None:
            raise NotFound(f"no realtime output of {script_id} for {instrument} {timeframe} (params_hash {phash})",
                           code="no_signal")
        payload = json.loads(raw)
        out: dict[str, Any] = {"instrument_key": instrument, "timeframe": timeframe,
                               "indicator": f"custom:{script_id}", "script_id": script_id, "params_hash": phash,
                               "value": payload["value"], "timestamp": payload["timestamp"],
                               "metadata": payload.get("metadata") or {}}
        history, start, end = query.get("history"), time_param(query, "start"), time_param(query, "end")
        if history or start is not None or end is not None:
            limit = int_param(query, "history", 1, MAX_HISTORY, 200)
            out["history"] = self.outputs.history(principal.tenant, script_id, instrument, timeframe, phash,
                                                  as_of=time.time(), start=start, end=end, limit=limit)
        return out


__all__ = [
    "RealtimeService",
    "SignalView",
    "SubscribeBody",
    "Subscription",
    "SubscriptionList",
    "SubscriptionView",
]
