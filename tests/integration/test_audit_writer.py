"""Audit rows written off the request path against the real PostgreSQL: in order, kept while the
database is unreachable, back-pressure instead of loss, written on SIGTERM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psycopg
import psycopg_pool
import pytest

from customscripts.registry.audit import AuditRow, AuditWriter


def _rows(cfg, tenant: str) -> list[tuple]:
    with psycopg.connect(cfg.pg_dsn) as conn:
        return conn.execute("SELECT script_id, status, duration_ms FROM audit WHERE tenant = %s ORDER BY id",
                            (tenant,)).fetchall()


def _row(tenant: str, i: int) -> AuditRow:
    return AuditRow(call_id=f"c{i}", script_id=f"s{i}", version=1, user_id="u", tenant=tenant,
                    action="execute", status="ok", duration_ms=float(i))


def _unreachable_pool() -> psycopg_pool.ConnectionPool:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return psycopg_pool.ConnectionPool(f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=1",
                                       min_size=0, max_size=1, timeout=0.2, open=True)


def test_rows_arrive_in_submission_order(stack, uid):
    writer = AuditWriter(psycopg_pool.ConnectionPool(stack.pg_dsn, min_size=1, max_size=2, open=True))
    tenant = f"audit-{uid}"
    for i in range(1200):  # several batches
        writer.submit(_row(tenant, i))
    assert writer.flush(timeout=30)
    assert [r[0] for r in _rows(stack, tenant)] == [f"s{i}" for i in range(1200)]
    writer.pool.close()


def test_rows_wait_while_the_database_is_unreachable_and_are_written_when_it_is_back(stack, uid):
    bad = _unreachable_pool()
    writer = AuditWriter(bad, max_pending=100)
    tenant = f"audit-{uid}"
    for i in range(20):
        writer.submit(_row(tenant, i))
    assert not writer.flush(timeout=1.0)  # nowhere to write them yet
    assert writer.pending == 20 and _rows(stack, tenant) == []
    writer.pool = psycopg_pool.ConnectionPool(stack.pg_dsn, min_size=1, max_size=1, open=True)  # "back"
    assert writer.flush(timeout=30)
    assert [r[2] for r in _rows(stack, tenant)] == [float(i) for i in range(20)]
    bad.close()
    writer.pool.close()


def test_a_full_queue_makes_the_caller_write_its_row_itself(stack, uid):
    bad = _unreachable_pool()
    writer = AuditWriter(bad, max_pending=3)
    tenant = f"audit-{uid}"
    for i in range(3):
        writer.submit(_row(tenant, i))
    with pytest.raises((psycopg.Error, psycopg_pool.PoolTimeout)):  # the request fails; no row is dropped
        writer.submit(_row(tenant, 3))
    assert writer.pending == 3
    good = psycopg_pool.ConnectionPool(stack.pg_dsn, min_size=1, max_size=2, open=True)
    writer.pool = good
    writer.submit(_row(tenant, 4))
    assert writer.flush(timeout=30)
    assert sorted(r[0] for r in _rows(stack, tenant)) == ["s0", "s1", "s2", "s4"]
    bad.close()
    good.close()


CHILD = """
import os, signal, sys, time
import psycopg_pool
from customscripts.registry.audit import AuditRow, AuditWriter, exit_cleanly_on_sigterm
exit_cleanly_on_sigterm()
writer = AuditWriter(psycopg_pool.ConnectionPool(sys.argv[1], min_size=1, max_size=1, open=True))
writer.pool.wait()
for i in range(300):
    writer.submit(AuditRow(f"c{i}", f"s{i}", 1, "u", sys.argv[2], "execute", "ok"))
os.kill(os.getpid(), signal.SIGTERM)  # stopped right after answering, as a replica being scaled down
time.sleep(30)
"""


def test_sigterm_writes_the_queued_rows_before_the_process_exits(stack, uid):
    tenant = f"audit-{uid}"
    proc = subprocess.run([sys.executable, "-c", CHILD, stack.pg_dsn, tenant], timeout=60,
                          capture_output=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert len(_rows(stack, tenant)) == 300
