"""Subscriptions: which script versions run on which candle closes, for whom, with which params."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from customscripts import ids
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "tenant": self.tenant, "user_id": self.user_id, "script_id": self.script_id,
            "version": self.version, "instrument_key": self.instrument_key, "timeframe": self.timeframe,
            "params": self.params, "params_hash": self.params_hash,
        }


_COLUMNS = "id, tenant, user_id, script_id, version, instrument_key, timeframe, params, params_hash"


class SubscriptionStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def add(self, *, tenant: str, user_id: str, script_id: str, version: int, instrument_key: str,
            timeframe: str, params: dict[str, Any]) -> tuple[Subscription, bool]:
        """Create a subscription; subscribing twice returns the existing one (created=False)."""
        row = (ids.tenant_id(tenant), ids.owner_id(user_id), ids.script_id(script_id), ids.version(version),
               ids.instrument_key(instrument_key), ids.timeframe(timeframe), json.dumps(params),
               params_hash(params))
        with self.pool.connection() as conn:
            inserted = conn.execute(
                f"INSERT INTO subscriptions (tenant, user_id, script_id, version, instrument_key, timeframe,"
                f" params, params_hash) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
                f" ON CONFLICT ON CONSTRAINT subscriptions_unique DO NOTHING RETURNING {_COLUMNS}", row,
            ).fetchone()
            if inserted:
                return Subscription(*inserted), True
            existing = conn.execute(
                f"SELECT {_COLUMNS} FROM subscriptions WHERE tenant = %s AND user_id = %s AND script_id = %s"
                " AND version = %s AND instrument_key = %s AND timeframe = %s AND params_hash = %s",
                (*row[:6], row[7]),
            ).fetchone()
        return Subscription(*existing), False

    def remove(self, tenant: str, user_id: str, subscription_id: int) -> bool:
        with self.pool.connection() as conn:
            cur = conn.execute("DELETE FROM subscriptions WHERE id = %s AND tenant = %s AND user_id = %s",
                               (subscription_id, tenant, user_id))
            return cur.rowcount == 1

    def for_user(self, tenant: str, user_id: str, script_id: str | None = None) -> list[Subscription]:
        query = f"SELECT {_COLUMNS} FROM subscriptions WHERE tenant = %s AND user_id = %s"
        args: list[Any] = [tenant, user_id]
        if script_id:
            query += " AND script_id = %s"
            args.append(script_id)
        with self.pool.connection() as conn:
            return [Subscription(*r) for r in conn.execute(query + " ORDER BY id", args)]

    def due(self, instrument_key: str, timeframe: str) -> list[Subscription]:
        with self.pool.connection() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM subscriptions WHERE instrument_key = %s AND timeframe = %s"
                                " ORDER BY id", (instrument_key, timeframe))
            return [Subscription(*r) for r in rows]

    def live_versions(self) -> set[tuple[str, int]]:
        """Versions with live subscriptions: the function budget never evicts these."""
        with self.pool.connection() as conn:
            return {(s, v) for s, v in conn.execute("SELECT DISTINCT script_id, version FROM subscriptions")}
