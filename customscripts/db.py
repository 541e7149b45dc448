"""PostgreSQL access: connection pools and the migrations the stack applies.

Migrations are plain SQL files in `customscripts/migrations/`, applied in name order once each,
under an advisory lock so several processes starting together apply them once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from customscripts import logs
from customscripts.config import Settings, settings

log = logs.get("customscripts.db")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 7_202_611


def migrate(cfg: Settings | None = None) -> list[str]:
    """Apply pending migrations; return the names applied. TimescaleDB is used when present."""
    cfg = cfg or settings()
    applied: list[str] = []
    with psycopg.connect(cfg.pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.name in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
            _ensure_reader_role(conn, cfg)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


def create_and_migrate(cfg: Settings | None = None) -> list[str]:
    """Create the database when it is missing, then `migrate` (idempotent): `customscripts migrate`, the
    cluster's migration Job, and the local stack's `up`."""
    cfg = cfg or settings()
    admin_dsn = cfg.pg_dsn.replace(f"dbname={cfg.pg_db}", "dbname=postgres")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (cfg.pg_db,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(cfg.pg_db)))
    return migrate(cfg)


def _ensure_reader_role(conn: psycopg.Connection, cfg: Settings) -> None:
    """The data gateway's read-only role: SELECT on the data tables, nothing else."""
    role = sql.Identifier(cfg.pg_reader_user)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (cfg.pg_reader_user,)).fetchone()
    if not exists:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(cfg.pg_reader_password)))
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(cfg.pg_db), role))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
    for table in READER_TABLES:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None:
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(table), role))


# Tables the data gateway may read; everything else stays invisible to its role.
READER_TABLES = ("candles", "metrics", "script_outputs")


def timescaledb_available(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    return row is not None


# A pooled connection idle for longer than this is revalidated (one round trip) before it is handed
# out. Used more recently, it was fine a moment ago: checking it on every checkout cost a round trip
# per query (~0.1 ms each, a dozen per execute), and a PostgreSQL restart takes longer than this.
CHECK_IDLE_S = 1.0
_RETURNED_AT = "_cs_returned_at"


def _mark_returned(conn: psycopg.Connection) -> None:
    """Pool `reset` hook: remember when the connection went back to the pool."""
    setattr(conn, _RETURNED_AT, time.monotonic())


class Pool(ConnectionPool):
    """A pool that survives a PostgreSQL restart with one reconnect, not one backoff per connection.

    psycopg_pool's own `check` hook discards a dead connection and sleeps (1 s, 2 s, 4 s, ...) before
    trying the next one: after a restart every idle connection is dead, so a pool of six gave up after
    its 30 s timeout. Here a checkout pings a connection idle for more than CHECK_IDLE_S; when the ping
    fails the server went away, so every idle connection is checked at once (`check`, which replaces
    the dead ones) and the checkout takes the next connection without sleeping.

    While the server is away a checkout waits at most `pg_wait_s` (then PoolTimeout: the API answers
    503), and a lost connection is retried for that long only: psycopg_pool's backoff would otherwise
    grow over the outage (1 s, 2 s, ... 64 s between attempts), and a request after the server came
    back waited for the next attempt. Connections are in autocommit mode unless `kwargs` says
    otherwise."""

    def __init__(self, conninfo: str, **options: Any) -> None:
        wait_s = settings().pg_wait_s
        options.setdefault("kwargs", {"autocommit": True, "connect_timeout": max(1, round(wait_s))})
        options.setdefault("timeout", wait_s)
        options.setdefault("reconnect_timeout", wait_s)
        super().__init__(conninfo, reset=_mark_returned, **options)

    def getconn(self, timeout: float | None = None) -> psycopg.Connection:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        conn = super().getconn(timeout)
        returned = getattr(conn, _RETURNED_AT, None)
        if returned is not None and time.monotonic() - returned <= CHECK_IDLE_S:
            return conn
        try:
            self.check_connection(conn)
        except psycopg.Error:
            self.putconn(conn)  # broken: the pool discards it and opens a replacement
            self.check()
            return super().getconn(max(deadline - time.monotonic(), 0.001))
        return conn


def pool(dsn: str | None = None, max_size: int = 10) -> ConnectionPool:
    """The process-wide pool of a DSN (the writer DSN by default). It connects in the background: a
    process started while PostgreSQL is away serves (503 for what needs the database) and recovers
    when it is back, rather than failing to start."""
    return _pool(dsn or settings().pg_dsn, max_size)


@functools.cache
def _pool(dsn: str, max_size: int) -> ConnectionPool:
    return Pool(dsn, min_size=1, max_size=max_size, open=True)


class ChangeFeed:
    """A LISTEN on one channel, kept open by a daemon thread: in-process caches drop what changed.

    `on_change(payload)` runs (on the feed's thread) for every notification, `on_reset()` whenever the
    feed connects or loses its connection (what changed meanwhile was not seen). `live` is True only
    while listening: a cache must not serve anything unvalidated otherwise. The triggers that notify
    are in the migrations (005 scripts, 006 candles).
    """

    def __init__(self, dsn: str, channel: str, on_change: Callable[[str], None],
                 on_reset: Callable[[], None]) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_change = on_change
        self.on_reset = on_reset
        self.live = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ChangeFeed:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name=f"feed-{self.channel}", daemon=True)
                self._thread.start()
        return self

    def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.on_reset()  # whatever changed while nobody listened
                    self.live = True
                    delay = 0.1
                    for note in conn.notifies():
                        self.on_change(note.payload)
            except psycopg.Error as exc:
                logs.event(log, "change feed lost; caches read through", logging.WARNING, channel=self.channel,
                           error=str(exc))
            finally:
                self.live = False
                self.on_reset()
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
