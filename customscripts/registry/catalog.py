"""The PostgreSQL mirror of the registry: what queries need (owner, tenant, versions, status,
dependencies, permissions, subscriptions). MinIO stays the truth for code and meta.json.

All SQL is static text with bound parameters; ids never become SQL text.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

from customscripts import db
from customscripts.config import Settings, settings
from customscripts.registry.audit import AuditRow, AuditWriter
from customscripts.registry.audit import insert as insert_audit
from customscripts.registry.models import Permissions, ScriptMeta


@dataclass(frozen=True)
class ScriptRow:
    script_id: str
    owner_id: str
    tenant: str
    name: str
    runtime_mode: str
    marketplace: bool
    draft_sha256: str | None
    latest_version: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class VersionRow:
    """One published version; fits permissions.ScriptLike so listings can be filtered cheaply."""

    script_id: str
    version: int
    owner_id: str
    tenant: str
    code_sha256: str
    meta_sha256: str
    status: str
    runtime_mode: str
    depends_on: list[str]
    permissions: Permissions
    created_at: datetime

    def as_json(self) -> dict:
        return {
            "script_id": self.script_id,
            "version": self.version,
            "status": self.status,
            "code_sha256": self.code_sha256,
            "runtime_mode": self.runtime_mode,
            "depends_on": list(self.depends_on),
            "created_at": self.created_at.isoformat(),
        }


_SCRIPT_COLS = ("script_id, owner_id, tenant, name, runtime_mode, marketplace, draft_sha256, latest_version, "
                "created_at, updated_at")
_VERSION_SELECT = (
    "SELECT v.script_id, v.version, s.owner_id, s.tenant, v.code_sha256, v.meta_sha256, v.status, "
    "v.runtime_mode, v.depends_on, v.permissions, v.created_at "
    "FROM script_versions v JOIN scripts s USING (script_id) "
)


# Published version rows kept per process. Nothing updates a script_versions row once inserted (a
# version is immutable; scripts.owner_id/tenant, joined in, never change), so a cached row is exact.
# Deprecation lives in columns this cache does not hold (`deprecations`). Cleared wholesale when full.
VERSION_CACHE_SIZE = 8192


SCRIPT_CACHE_SIZE = 8192
_UNKNOWN = object()  # not in the cache (None there: known not to exist)
NOTIFY_CHANNEL = "cs_scripts"  # migrations/005_scripts_notify.sql


class ScriptCache:
    """Script rows kept in memory for the execute path, exact up to the moment a change commits.

    Why: the execute path reads its script row on every call; a round trip is ~0.25 ms. Rows are
    dropped when PostgreSQL announces a change (a trigger NOTIFYs every insert, update and delete on
    `scripts` at commit, read by a `db.ChangeFeed`), and at once for changes made by this process.
    Nothing is served while the feed is down. A row changed by another replica may still be served
    for the time a notification takes to arrive (well under a millisecond on one host). Absent ids
    are remembered as absent the same way (an insert is announced like any change), so resolving a
    bare id in the caller's namespace (registry/namespace.py) costs no round trip either.
    """

    def __init__(self, dsn: str, load: Callable[[str], ScriptRow | None]) -> None:
        self.load = load
        self.rows: dict[str, ScriptRow | None] = {}
        self.generation = 0  # bumped by every invalidation: a read that spans one is not kept
        self._lock = threading.Lock()
        self.feed = db.ChangeFeed(dsn, NOTIFY_CHANNEL, self.invalidate, self.invalidate)

    @property
    def live(self) -> bool:
        return self.feed.live

    def get(self, script_id: str) -> ScriptRow | None:
        self.feed.start()
        cached = self.rows.get(script_id, _UNKNOWN)
        if cached is not _UNKNOWN and self.live:
            return cached  # type: ignore[return-value]
        generation = self.generation
        row = self.load(script_id)
        if self.live:
            with self._lock:
                if self.generation == generation:
                    if len(self.rows) >= SCRIPT_CACHE_SIZE:
                        self.rows.clear()
                    self.rows[script_id] = row
        return row

    def invalidate(self, script_id: str | None = None) -> None:
        """Drop one row (or all, with None or an empty payload)."""
        with self._lock:
            self.generation += 1
            if script_id:
                self.rows.pop(script_id, None)
            else:
                self.rows.clear()


def _version(row: tuple) -> VersionRow:
    return VersionRow(*row[:9], permissions=Permissions.model_validate(row[9]), created_at=row[10])


class Catalog:
    def __init__(self, cfg: Settings | None = None) -> None:
        self.cfg = cfg or settings()
        self.pool = db.pool(self.cfg.pg_dsn)
        self.audit_log = AuditWriter(self.pool)
        self.scripts = ScriptCache(self.cfg.pg_dsn, self.get_script)
        self._versions: dict[tuple[str, int], VersionRow] = {}
        self._written = threading.local()  # script ids changed in this thread's open transaction

    def _remember(self, rows: list[VersionRow]) -> None:
        if len(self._versions) + len(rows) > VERSION_CACHE_SIZE:
            self._versions.clear()
        for v in rows:
            if v.status == "published":
                self._versions[(v.script_id, v.version)] = v

    def forget_version(self, script_id: str, version: int) -> None:
        """Drop a cached version row (for whatever changes one in the future)."""
        self._versions.pop((script_id, version), None)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A transaction; script rows it changed leave this process's ScriptCache when it ends."""
        written: set[str] = set()
        self._written.ids = written
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield conn
        finally:
            self._written.ids = None
            for script_id in written:
                self.scripts.invalidate(script_id)

    def _changed(self, script_id: str) -> None:
        ids = getattr(self._written, "ids", None)
        if ids is not None:
            ids.add(script_id)
        self.scripts.invalidate(script_id)

    @contextlib.contextmanager
    def _conn(self, conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
        if conn is not None:
            yield conn
        else:
            with self.pool.connection() as fresh:
                yield fresh

    # ----------------------------------------------------------------- scripts

    def count_owned(self, conn: psycopg.Connection, tenant: str, owner_id: str) -> int:
        """Under a per-owner transaction lock, so concurrent creates cannot both pass the cap."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"owner:{tenant}:{owner_id}",))
        row = conn.execute("SELECT count(*) FROM scripts WHERE tenant = %s AND owner_id = %s",
                           (tenant, owner_id)).fetchone()
        return int(row[0])

    def insert_script(self, conn: psycopg.Connection, meta: ScriptMeta) -> bool:
        """Claim a globally unique script id; False when it is taken."""
        row = conn.execute(
            "INSERT INTO scripts (script_id, owner_id, tenant, name, runtime_mode, draft_sha256, created_at,"
            " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (script_id) DO NOTHING"
            " RETURNING script_id",
            (meta.script_id, meta.owner_id, meta.tenant, meta.name, meta.runtime_mode, meta.code_sha256,
             meta.created_at, meta.updated_at),
        ).fetchone()
        self._changed(meta.script_id)
        return row is not None

    def update_draft(self, conn: psycopg.Connection, meta: ScriptMeta) -> None:
        self._changed(meta.script_id)
        conn.execute(
            "UPDATE scripts SET name = %s, runtime_mode = %s, draft_sha256 = %s, updated_at = %s"
            " WHERE script_id = %s",
            (meta.name, meta.runtime_mode, meta.code_sha256, meta.updated_at, meta.script_id),
        )

    def get_script(self, script_id: str, conn: psycopg.Connection | None = None, *,
                   for_update: bool = False) -> ScriptRow | None:
        query = f"SELECT {_SCRIPT_COLS} FROM scripts WHERE script_id = %s"
        query += " FOR UPDATE" if for_update else ""
        with self._conn(conn) as c:
            row = c.execute(query, (script_id,)).fetchone()
        return ScriptRow(*row) if row else None

    # ----------------------------------------------------------------- versions

    def insert_version(self, conn: psycopg.Connection, meta: ScriptMeta, meta_sha256: str) -> None:
        conn.execute(
            "INSERT INTO script_versions (script_id, version, code_sha256, meta_sha256, status, runtime_mode,"
            " depends_on, permissions, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (meta.script_id, meta.version, meta.code_sha256, meta_sha256, meta.status, meta.runtime_mode,
             list(meta.depends_on), Jsonb(meta.permissions.model_dump(mode="json")), meta.created_at),
        )
        self._changed(meta.script_id)
        conn.execute(
            "UPDATE scripts SET latest_version = %s, marketplace = %s, updated_at = now()"
            " WHERE script_id = %s",
            (meta.version, meta.permissions.marketplace, meta.script_id),
        )

    def versions(self, script_id: str) -> list[VersionRow]:
        with self._conn(None) as c:
            rows = c.execute(_VERSION_SELECT + "WHERE v.script_id = %s ORDER BY v.version",
                             (script_id,)).fetchall()
        return [_version(r) for r in rows]

    def get_version(self, script_id: str, version: int) -> VersionRow | None:
        with self._conn(None) as c:
            row = c.execute(_VERSION_SELECT + "WHERE v.script_id = %s AND v.version = %s",
                            (script_id, version)).fetchone()
        return _version(row) if row else None

    def get_versions(self, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], VersionRow]:
        """Several (script_id, version) rows in one query (dependency validation, closures); published
        rows come from the cache once read."""
        out = {p: self._versions[p] for p in pairs if p in self._versions}
        missing = [p for p in pairs if p not in out]
        if not missing:
            return out
        with self._conn(None) as c:
            rows = c.execute(
                _VERSION_SELECT
                + "WHERE (v.script_id, v.version) IN (SELECT * FROM unnest(%s::text[], %s::int[]))",
                ([p[0] for p in missing], [p[1] for p in missing]),
            ).fetchall()
        found = [_version(r) for r in rows]
        self._remember(found)
        out.update({(v.script_id, v.version): v for v in found})
        return out

    # ----------------------------------------------------------------- listing and deprecation

    def listing_candidates(self, tenant: str, user_id: str, *, after: str, limit: int, owner_id: str | None = None,
                           runtime_mode: str | None = None, marketplace: bool | None = None,
                           text: str | None = None) -> list[ScriptRow]:
        """Scripts of the caller's tenant and those they hold a marketplace subscription for, in id
        order after `after`: the rows GET /scripts may show, before each passes the visibility check
        (RegistryService). Other tenants' scripts without the caller's subscription are never read."""
        with self._conn(None) as c:
            rows = c.execute(
                f"SELECT {_SCRIPT_COLS} FROM scripts WHERE script_id > %(after)s"
                " AND (tenant = %(tenant)s OR script_id IN (SELECT script_id FROM marketplace_subscriptions"
                "      WHERE user_id = %(user)s AND tenant = %(tenant)s))"
                " AND (%(owner)s::text IS NULL OR owner_id = %(owner)s)"
                " AND (%(mode)s::text IS NULL OR runtime_mode = %(mode)s)"
                " AND (%(listed)s::boolean IS NULL OR marketplace = %(listed)s)"
                " AND (%(text)s::text IS NULL OR strpos(lower(name), %(text)s) > 0"
                "      OR strpos(script_id, %(text)s) > 0)"
                " ORDER BY script_id LIMIT %(limit)s",
                {"after": after, "tenant": tenant, "user": user_id, "owner": owner_id, "mode": runtime_mode,
                 "listed": marketplace, "text": text.lower() if text else None, "limit": limit},
            ).fetchall()
        return [ScriptRow(*r) for r in rows]

    def deprecations(self, script_ids: list[str]) -> dict[tuple[str, int], tuple[datetime, str | None]]:
        """(script_id, version) -> (deprecated_at, reason) of the deprecated versions of these scripts.
        Read live (not from the version cache): deprecation is the one change a version row sees."""
        if not script_ids:
            return {}
        with self._conn(None) as c:
            rows = c.execute(
                "SELECT script_id, version, deprecated_at, deprecation_reason FROM script_versions"
                " WHERE script_id = ANY(%s) AND deprecated_at IS NOT NULL",
                (script_ids,),
            ).fetchall()
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    def set_deprecated(self, script_id: str, version: int, deprecated: bool, reason: str | None) -> bool:
        """Mark or unmark a version deprecated; False when the version does not exist."""
        with self._conn(None) as c:
            row = c.execute(
                "UPDATE script_versions SET deprecated_at = CASE WHEN %(on)s"
                " THEN coalesce(deprecated_at, now()) END, deprecation_reason = CASE WHEN %(on)s THEN %(reason)s END"
                " WHERE script_id = %(sid)s AND version = %(ver)s RETURNING version",
                {"on": deprecated, "reason": reason, "sid": script_id, "ver": version},
            ).fetchone()
        return row is not None

    # ----------------------------------------------------------------- marketplace

    def subscribe(self, script_id: str, user_id: str, tenant: str) -> bool:
        """True when the subscription is new."""
        with self._conn(None) as c:
            row = c.execute(
                "INSERT INTO marketplace_subscriptions (script_id, user_id, tenant) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING script_id",
                (script_id, user_id, tenant),
            ).fetchone()
        return row is not None

    def subscribed_scripts(self, user_id: str, tenant: str, script_ids: list[str]) -> set[str]:
        if not script_ids:
            return set()
        with self._conn(None) as c:
            rows = c.execute(
                "SELECT script_id FROM marketplace_subscriptions WHERE user_id = %s AND tenant = %s"
                " AND script_id = ANY(%s)",
                (user_id, tenant, script_ids),
            ).fetchall()
        return {r[0] for r in rows}

    # ----------------------------------------------------------------- audit

    def audit(self, *, action: str, script_id: str, version: int | None, user_id: str, tenant: str,
              status: str, call_id: str | None = None, detail: str | None = None,
              params_hash: str | None = None, output_hash: str | None = None,
              duration_ms: float | None = None, cpu_ms: float | None = None, memory_mb: float | None = None,
              conn: psycopg.Connection | None = None) -> None:
        """One audit row, the one way every attempt and action is recorded: in the caller's transaction
        (`conn`: it commits with the change it records), else committed durably through the process's
        AuditWriter before this returns (sharing its commit with concurrent callers; 503
        `audit_unavailable` after CS_AUDIT_WAIT_S). The realtime scheduler alone queues its batches'
        rows (`audit_log.submit`): nobody waits on an answer there."""
        row = AuditRow(call_id, script_id, version, user_id, tenant, action, status, detail, params_hash,
                       output_hash, duration_ms, cpu_ms, memory_mb)
        if conn is not None:
            insert_audit(conn, [row])
        elif self.cfg.audit_durable:
            self.audit_log.write(row, self.cfg.audit_wait_s)
        else:
            self.audit_log.submit(row)
