"""Subscriptions: which script versions run on which candle closes, for whom, with which params."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from customscripts import ids
from customscripts.auth import Principal
from customscripts.outputs import params_hash


@dataclass(frozen=True)
class Subscription:
    id: int
    tenant: str
    user_id: str
    script_id: str
    version: int
    instrument_key: str
    timeframe: str
    params: dict[str, Any] = field(default_factory=dict)
    params_hash: str = ""
    principal: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "tenant": self.tenant, "user_id": self.user_id, "script_id": self.script_id,
            "version": self.version, "instrument_key": self.instrument_key, "timeframe": self.timeframe,
            "params": self.params, "params_hash": self.params_hash,
        }

    def as_principal(self) -> Principal:
        """The subscriber as of subscribing (claims snapshot): what the scheduler re-checks with."""
        p = self.principal or {}
        return Principal(user_id=self.user_id, tenant=self.tenant, tier=str(p.get("tier", "")),
                         features=frozenset(p.get("features", ())), teams=frozenset(p.get("teams", ())),
                         orgs=frozenset(p.get("orgs", ())))


def principal_snapshot(principal: Principal) -> dict[str, Any]:
    return {"tier": principal.tier, "features": sorted(principal.features), "teams": sorted(principal.teams),
            "orgs": sorted(principal.orgs)}


_COLUMNS = "id, tenant, user_id, script_id, version, instrument_key, timeframe, params, params_hash, principal"


class SubscriptionStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def add(self, *, tenant: str, user_id: str, script_id: str, version: int, instrument_key: str,
            timeframe: str, params: dict[str, Any], principal: dict[str, Any] | None = None,
            max_for_user: int | None = None) -> tuple[Subscription, bool]:
        """Create a subscription; subscribing twice returns the existing one (created=False) and refreshes
        its principal snapshot. With `max_for_user`, a new one beyond the cap raises QuotaExceeded."""
        row = (ids.tenant_id(tenant), ids.owner_id(user_id), ids.script_id(script_id), ids.version(version),
               ids.instrument_key(instrument_key), ids.timeframe(timeframe), json.dumps(params),
               params_hash(params), json.dumps(principal or {}))
        with self.pool.connection() as conn, conn.transaction():
            # one subscriber at a time per user: the cap check and the insert see the same count
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"subs:{tenant}:{user_id}",))
            existing = conn.execute(
                f"UPDATE subscriptions SET principal = %s::jsonb WHERE tenant = %s AND user_id = %s"
                f" AND script_id = %s AND version = %s AND instrument_key = %s AND timeframe = %s"
                f" AND params_hash = %s RETURNING {_COLUMNS}", (row[8], *row[:6], row[7]),
            ).fetchone()
            if existing:
                return Subscription(*existing), False
            if max_for_user is not None:
                (count,) = conn.execute("SELECT count(*) FROM subscriptions WHERE tenant = %s AND user_id = %s",
                                        row[:2]).fetchone()
                if count >= max_for_user:
                    raise QuotaExceeded(count)
            inserted = conn.execute(
                f"INSERT INTO subscriptions (tenant, user_id, script_id, version, instrument_key, timeframe,"
                f" params, params_hash, principal) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s::jsonb)"
                f" RETURNING {_COLUMNS}", row,
            ).fetchone()
        return Subscription(*inserted), True

    def get(self, subscription_id: int) -> Subscription | None:
        with self.pool.connection() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM subscriptions WHERE id = %s", (subscription_id,)).fetchone()
        return Subscription(*row) if row else None

    def remove(self, tenant: str, user_id: str, subscription_id: int, script_id: str | None = None) -> bool:
        query = "DELETE FROM subscriptions WHERE id = %s AND tenant = %s AND user_id = %s"
        args: list[Any] = [subscription_id, tenant, user_id]
        if script_id is not None:
            query += " AND script_id = %s"
            args.append(script_id)
        with self.pool.connection() as conn:
            return conn.execute(query, args).rowcount == 1

    def count_for_user(self, tenant: str, user_id: str) -> int:
        with self.pool.connection() as conn:
            return conn.execute("SELECT count(*) FROM subscriptions WHERE tenant = %s AND user_id = %s",
                                (tenant, user_id)).fetchone()[0]

    def for_user(self, tenant: str, user_id: str, script_id: str | None = None) -> list[Subscription]:
        query = f"SELECT {_COLUMNS} FROM subscriptions WHERE tenant = %s AND user_id = %s"
        args: list[Any] = [tenant, user_id]
        if script_id:
            query += " AND script_id = %s"
            args.append(script_id)
        with self.pool.connection() as conn:
            return [Subscription(*r) for r in conn.execute(query + " ORDER BY id", args)]

    def due(self, instrument_key: str, timeframe: str) -> list[Subscription]:
        return self.due_many([(instrument_key, timeframe)])

    def due_many(self, keys: Iterable[tuple[str, str]]) -> list[Subscription]:
        """Every subscription on any of the (instrument_key, timeframe) pairs: one query per event batch."""
        pairs = sorted(set(keys))
        if not pairs:
            return []
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM subscriptions WHERE (instrument_key, timeframe) IN"
                " (SELECT * FROM unnest(%s::text[], %s::text[])) ORDER BY id",
                ([p[0] for p in pairs], [p[1] for p in pairs]))
            return [Subscription(*r) for r in rows]

    def due_timeframe(self, timeframe: str) -> list[Subscription]:
        """Every subscription on a timeframe (a timer tick of that timeframe makes them all due)."""
        with self.pool.connection() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM subscriptions WHERE timeframe = %s ORDER BY id",
                                (timeframe,))
            return [Subscription(*r) for r in rows]

    def live_versions(self) -> set[tuple[str, int]]:
        """Versions with live subscriptions: the function budget never evicts these."""
        with self.pool.connection() as conn:
            return {(s, v) for s, v in conn.execute("SELECT DISTINCT script_id, version FROM subscriptions")}


class QuotaExceeded(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(f"{count} subscriptions already")
        self.count = count
