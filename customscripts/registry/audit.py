"""The audit trail: one row per execution (one-time and realtime, denied ones included) and per
registry action.

Why a writer thread: an execution's row is known only once the function has answered, and waiting
for its INSERT would put a database round trip (~0.3 ms on the dev machine) on every one-time
execute. `AuditWriter.submit` queues the row and returns; a daemon thread inserts whatever has
queued up (within LINGER_S) in one batch. Nothing is dropped: while the database is unreachable the rows wait (and
are retried with backoff); past `max_pending` waiting rows the caller inserts its own row
synchronously, so a request then fails as it did before rather than losing its row. The queue is
flushed at interpreter exit, and `exit_cleanly_on_sigterm` makes SIGTERM (how a function replica
is stopped) an orderly exit. A process killed outright loses at most the rows of the last few
milliseconds. Registry actions that run in a transaction write their row inside it (`insert`).
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
import time
from collections import deque
from typing import NamedTuple

import psycopg
import psycopg_pool

from customscripts import logs

log = logs.get("customscripts.audit")

BATCH_ROWS = 500
LINGER_S = 0.05  # a row waits at most this long for others to share its INSERT
MAX_PENDING = 10_000
RETRY_MAX_S = 2.0


class AuditRow(NamedTuple):
    call_id: str | None
    script_id: str
    version: int | None
    user_id: str
    tenant: str
    action: str
    status: str
    detail: str | None = None
    params_hash: str | None = None
    output_hash: str | None = None
    duration_ms: float | None = None
    cpu_ms: float | None = None
    memory_mb: float | None = None


INSERT_SQL = f"INSERT INTO audit ({', '.join(AuditRow._fields)}) VALUES ({', '.join(['%s'] * len(AuditRow._fields))})"
COPY_SQL = f"COPY audit ({', '.join(AuditRow._fields)}) FROM STDIN"


def insert(conn: psycopg.Connection, rows: list[AuditRow]) -> None:
    """Insert rows on this connection (inside the caller's transaction, if any); many by COPY, which
    keeps thousands of realtime evaluations a second cheap for the database."""
    with conn.cursor() as cur:
        if len(rows) == 1:
            cur.execute(INSERT_SQL, rows[0])
            return
        with cur.copy(COPY_SQL) as copy:
            for row in rows:
                copy.write_row(row)


class AuditWriter:
    """Rows submitted here reach the audit table shortly after, in batches, in submission order."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, *, max_pending: int = MAX_PENDING,
                 batch_rows: int = BATCH_ROWS, linger_s: float = LINGER_S) -> None:
        self.pool = pool
        self.max_pending = max_pending
        self.batch_rows = batch_rows
        self.linger_s = linger_s
        self._flushing = 0
        self._pending: deque[AuditRow] = deque()
        self._writing = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, row: AuditRow) -> None:
        with self._cond:
            if len(self._pending) + self._writing < self.max_pending:
                self._pending.append(row)
                self._start()
                self._cond.notify_all()
                return
        self._write([row])  # back-pressure: the database is behind or down; this caller waits for it

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted row is written; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._pending or self._writing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    @property
    def pending(self) -> int:
        return len(self._pending) + self._writing

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
            atexit.register(self._flush_at_exit)

    def _flush_at_exit(self) -> None:
        if not self.flush(timeout=5.0):
            logs.event(log, "audit rows not written at exit", logging.ERROR, rows=self.pending)

    def _write(self, rows: list[AuditRow]) -> None:
        with self.pool.connection() as conn:
            insert(conn, rows)

    def _run(self) -> None:
        delay = 0.05
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                if len(self._pending) < self.batch_rows and not self._flushing:
                    self._cond.wait(self.linger_s)  # let a few more rows join this insert
                rows = [self._pending.popleft() for _ in range(min(self.batch_rows, len(self._pending)))]
                self._writing = len(rows)
            try:
                self._write(rows)
                failed = None
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                failed = exc
            with self._cond:
                if failed is not None:
                    self._pending.extendleft(reversed(rows))  # first in, first written, when it is back
                self._writing = 0
                self._cond.notify_all()
            if failed is None:
                delay = 0.05
                continue
            logs.event(log, "audit insert failed; retrying", logging.WARNING, rows=len(rows), error=str(failed))
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a replica being stopped) becomes SystemExit, so atexit flushes the audit queue.
    Only from the main thread, and only over the default action."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
