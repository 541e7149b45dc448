"""Subscriptions: which script versions run on which candle closes, for whom, with which params."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from customscripts import ids
from customscripts.auth import Principal
from customscripts.faas.naming import function_name
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
            max_for_user: int | None = None, functions: Sequence[str] = (), tenant_share: int | None = None,
            pin_limit: int | None = None) -> tuple[Subscription, bool]:
        """Create a subscription; subscribing twice returns the existing one (created=False) and refreshes
        its principal snapshot. With `max_for_user`, a new one beyond the cap raises QuotaExceeded.

        `functions` are the script functions the subscription pins (its dependency closure). With
        `tenant_share`, pinning more distinct functions than that for the tenant raises
        TenantShareExceeded; with `pin_limit`, more for all tenants together raises PinLimitReached."""
        row = (ids.tenant_id(tenant), ids.owner_id(user_id), ids.script_id(script_id), ids.version(version),
               ids.instrument_key(instrument_key), ids.timeframe(timeframe), json.dumps(params),
               params_hash(params), json.dumps(principal or {}), list(functions) or None)
        with self.pool.connection() as conn, conn.transaction():
            # one subscriber at a time per tenant: the caps and the insert see the same rows
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"subs:{tenant}",))
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
            self._check_pins(conn, tenant, set(functions), tenant_share, pin_limit)
            inserted = conn.execute(
                f"INSERT INTO subscriptions (tenant, user_id, script_id, version, instrument_key, timeframe,"
                f" params, params_hash, principal, functions) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s,"
                f" %s::jsonb, %s) RETURNING {_COLUMNS}", row,
            ).fetchone()
        return Subscription(*inserted), True

    @staticmethod
    def _check_pins(conn: Any, tenant: str, wanted: set[str], tenant_share: int | None,
                    pin_limit: int | None) -> None:
        """Within add()'s transaction, holding the tenant's lock (and, when the subscription pins a
        function nobody pins yet, the lock for all tenants' pins)."""
        if not wanted or (tenant_share is None and pin_limit is None):
            return
        mine = _pins(conn, tenant).get(tenant, set())
        if tenant_share is not None and len(mine | wanted) > tenant_share:
            raise TenantShareExceeded(len(mine), len(wanted - mine), tenant_share)
        if pin_limit is None or wanted <= mine:
            return
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('subs:pins'))")
        everyone = set().union(*_pins(conn).values())
        if not wanted <= everyone and len(everyone | wanted) > pin_limit:
            raise PinLimitReached(len(everyone), pin_limit)

    def pinned_functions(self) -> dict[str, set[str]]:
        """Per tenant, the script functions its live subscriptions pin, dependencies included: the
        function budget never evicts these, and charges each to every tenant that pins it."""
        with self.pool.connection() as conn:
            return _pins(conn)

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



def _pins(conn: Any, tenant: str | None = None) -> dict[str, set[str]]:
    """tenant -> pinned function names; rows from before the `functions` column pin their own version."""
    query = "SELECT DISTINCT tenant, script_id, version, functions FROM subscriptions"
    rows = conn.execute(query + " WHERE tenant = %s", (tenant,)) if tenant else conn.execute(query)
    pins: dict[str, set[str]] = {}
    for row_tenant, script_id, version, functions in rows:
        pins.setdefault(row_tenant, set()).update(functions or (function_name(script_id, version),))
    return pins


class QuotaExceeded(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(f"{count} subscriptions already")
        self.count = count


class TenantShareExceeded(Exception):
    """The subscription would pin more script functions than the tenant's share of the budget."""

    def __init__(self, pinned: int, new: int, share: int) -> None:
        super().__init__(f"{pinned} functions pinned, {new} more wanted, share {share}")
        self.pinned, self.new, self.share = pinned, new, share


class PinLimitReached(Exception):
    """All tenants together already pin as many script functions as the budget lets them."""

    def __init__(self, pinned: int, limit: int) -> None:
        super().__init__(f"{pinned} functions pinned, limit {limit}")
        self.pinned, self.limit = pinned, limit
