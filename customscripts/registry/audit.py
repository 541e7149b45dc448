"""The audit trail: one row per execution (one-time and realtime, denied ones included) and per
registry action.

Answered means audited. A one-time execute's row must be durable before its answer leaves
registry-fn (README "Audit: answered means audited"): `AuditWriter.write` queues the row and waits until the
writer thread has committed it with `synchronous_commit = on` (whatever the cluster's default), so a
process or database crash right after the answer cannot lose it. Group commit keeps that cheap:
the thread takes every row queued by then into one INSERT/COPY and one commit, and every caller
waiting on that batch is released by the same commit; rows that arrive while a commit is running
share the next one. A lone execute so pays about one synchronous commit round trip and never
lingers. If the row is not committed within the caller's wait (the database is down), `write`
raises `AuditUnavailable` (503 `audit_unavailable`): the execute is not answered as if it had been
recorded. The row stays queued and is written when the database is back (an attempt is recorded
even so, unless the process dies first).

`submit` is the asynchronous form (realtime evaluations, from the scheduler): the row is queued and
the caller goes on; the thread lingers up to LINGER_S for more rows to share the insert. Nothing is
dropped: while the database is unreachable the rows wait (retried with backoff); past `max_pending`
waiting rows the caller inserts its own row synchronously, so a request then fails as it did before
rather than losing its row. The queue is flushed at interpreter exit, and `exit_cleanly_on_sigterm`
makes SIGTERM (how a function replica is stopped) an orderly exit. Registry actions that run in a
transaction write their row inside it (`insert`).
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import psycopg
import psycopg_pool

from customscripts import logs
from customscripts.errors import Unavailable
from customscripts.retry import RetryPolicy
from customscripts.text import storable

log = logs.get("customscripts.audit")

BATCH_ROWS = 500
LINGER_S = 0.05  # a row waits at most this long for others to share its INSERT
MAX_PENDING = 10_000
# The writer never gives up on a row (it only pauses between attempts); while a caller waits on its
# row the pauses stay short, so its commit comes soon after the database is back.
RETRY = RetryPolicy(attempts=2**31, backoff_s=0.05, max_backoff_s=2.0, jitter=False)
RETRY_WAITED = RetryPolicy(attempts=2**31, backoff_s=0.05, max_backoff_s=0.2, jitter=False)
CONNECT_TIMEOUT_S = 1.0  # a pooled connection not handed out by then: the attempt failed, retry
DURABLE_SQL = "SET LOCAL synchronous_commit = on"  # this transaction's commit waits for the WAL flush


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


class AuditUnavailable(Unavailable):
    """An execute's audit row could not be made durable in time: it is not answered as recorded."""

    code = "audit_unavailable"


def insert(conn: psycopg.Connection, rows: list[AuditRow]) -> None:
    """Insert rows on this connection (inside the caller's transaction, if any); many by COPY, which
    keeps thousands of realtime evaluations a second cheap for the database."""
    # a script's error text may hold what PostgreSQL cannot (customscripts/text.py)
    rows = [row if storable(row.detail) is row.detail else row._replace(detail=storable(row.detail)) for row in rows]
    with conn.cursor() as cur:
        if len(rows) == 1:
            cur.execute(INSERT_SQL, rows[0])
            return
        with cur.copy(COPY_SQL) as copy:
            for row in rows:
                copy.write_row(row)


class AuditWriter:
    """Rows reach the audit table in batches, in submission order, each batch in one durable commit:
    `write` waits for its row's commit, `submit` does not."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, *, max_pending: int = MAX_PENDING,
                 batch_rows: int = BATCH_ROWS, linger_s: float = LINGER_S) -> None:
        self.pool = pool
        self.max_pending = max_pending
        self.batch_rows = batch_rows
        self.linger_s = linger_s
        self._flushing = 0
        self._pending: deque[AuditRow] = deque()
        self._writing = 0
        self._queued = 0  # rows ever queued; a row's ticket is the count after it
        self._committed = 0  # of those, rows committed (in queue order: a failed batch goes back first)
        self._waiting = 0  # callers of write() waiting on their commit
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, row: AuditRow) -> None:
        """Queue the row and return; it is written shortly after (realtime evaluations)."""
        with self._cond:
            if self._queue(row) is not None:
                return
        self._write([row])  # back-pressure: the database is behind or down; this caller waits for it

    def submit_many(self, rows: Iterable[AuditRow]) -> None:
        """`submit` for a batch's rows: one lock and one wake-up of the writer for all of them (a
        realtime batch has thousands); rows that find the queue full are written by this caller."""
        rows = list(rows)
        with self._cond:
            queued = self._queue_many(rows)
        if queued < len(rows):
            self._write(rows[queued:])  # back-pressure, as in submit

    def write(self, row: AuditRow, timeout: float) -> None:
        """Return once the row is committed durably, sharing the commit with whatever else is queued;
        `AuditUnavailable` if that takes longer than `timeout` (the row stays queued)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            ticket = self._queue(row)
            if ticket is not None:
                self._waiting += 1
                try:
                    while self._committed < ticket:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise AuditUnavailable("this execute's audit row could not be recorded in time "
                                                   "(database unavailable); retry", retry_after_s=1)
                        self._cond.wait(left)
                    return
                finally:
                    self._waiting -= 1
        try:  # back-pressure, as in submit
            self._write([row])
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise AuditUnavailable(f"the audit row could not be recorded: {type(exc).__name__}",
                                   retry_after_s=1) from None

    def _queue(self, row: AuditRow) -> int | None:
        """Append under the lock; the row's ticket, or None when the queue is full."""
        return self._queued if self._queue_many([row]) else None

    def _queue_many(self, rows: list[AuditRow]) -> int:
        """Append under the lock as many rows as the queue has room for; how many that was."""
        taken = rows[:max(0, self.max_pending - len(self._pending) - self._writing)]
        if taken:
            self._pending.extend(taken)
            self._queued += len(taken)
            self._start()
            self._cond.notify_all()
        return len(taken)

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
        """One transaction, committed synchronously whatever the cluster's default."""
        with self.pool.connection(timeout=CONNECT_TIMEOUT_S) as conn, conn.transaction():
            conn.execute(DURABLE_SQL)
            insert(conn, rows)

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                if len(self._pending) < self.batch_rows and not (self._flushing or self._waiting):
                    # nobody waits on these rows: let a few more join this insert (a caller of
                    # write() never lingers; rows queued while a commit runs share the next one)
                    self._cond.wait(self.linger_s)
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
                else:
                    self._committed += len(rows)
                self._writing = 0
                self._cond.notify_all()
                waited = self._waiting > 0
            if failed is None:
                failures = 0
                continue
            failures += 1
            logs.event(log, "audit insert failed; retrying", logging.WARNING, rows=len(rows), error=str(failed))
            time.sleep((RETRY_WAITED if waited else RETRY).pause(failures))


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a replica being stopped) becomes SystemExit, so atexit flushes the audit queue.
    Only from the main thread, and only over the default action."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
