"""The audit writer against the real PostgreSQL: in order, kept while the database is unreachable,
back-pressure instead of loss, written on SIGTERM; and answered means audited: an execute's row is
committed before its answer leaves, over the registry's route and a version's function URL alike,
whatever its outcome (ok, the script's error, denied, the function failing)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid

import psycopg
import psycopg_pool
import pytest
import requests

from customscripts.faas.naming import function_name
from customscripts.http import http_status
from customscripts.registry.audit import AuditRow, AuditUnavailable, AuditWriter
from tests.integration.registry_support import Caller


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


def test_a_batch_handed_over_at_once_keeps_its_order_and_the_queue_bound(stack, uid):
    """submit_many (the realtime batch's one hand-over): rows land in order; what does not fit in the
    queue is written by the caller, never dropped."""
    bad = _unreachable_pool()
    writer = AuditWriter(bad, max_pending=3)
    tenant = f"audit-{uid}"
    with pytest.raises((psycopg.Error, psycopg_pool.PoolTimeout)):  # 3 queued, the other 2 fail for the caller
        writer.submit_many([_row(tenant, i) for i in range(5)])
    assert writer.pending == 3
    good = psycopg_pool.ConnectionPool(stack.pg_dsn, min_size=1, max_size=2, open=True)
    writer.pool = good
    writer.submit_many([_row(tenant, i) for i in range(5, 1205)])  # still full: the caller writes them
    assert writer.flush(timeout=30)
    assert sorted(r[0] for r in _rows(stack, tenant)) == sorted(f"s{i}" for i in (0, 1, 2, *range(5, 1205)))
    roomy = AuditWriter(good)
    roomy.submit_many([_row(f"{tenant}-2", i) for i in range(1200)])  # queued: several batches, in order
    assert roomy.flush(timeout=30)
    assert [r[0] for r in _rows(stack, f"{tenant}-2")] == [f"s{i}" for i in range(1200)]
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


def test_write_returns_once_its_row_is_committed_also_under_concurrency(stack, uid):
    """Callers of write() share commits (group commit) but each returns only after its own row is in."""
    writer = AuditWriter(psycopg_pool.ConnectionPool(stack.pg_dsn, min_size=1, max_size=2, open=True))
    tenant = f"audit-{uid}"
    missing: list[int] = []

    def caller(first: int) -> None:
        with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
            for i in range(first, first + 25):
                writer.write(_row(tenant, i), timeout=30)
                if conn.execute("SELECT 1 FROM audit WHERE tenant = %s AND call_id = %s",
                                (tenant, f"c{i}")).fetchone() is None:
                    missing.append(i)

    threads = [threading.Thread(target=caller, args=(t * 100,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert missing == [] and len(_rows(stack, tenant)) == 150
    writer.pool.close()


def test_write_answers_audit_unavailable_when_the_row_cannot_be_committed_and_keeps_the_row(stack, uid):
    bad = _unreachable_pool()
    writer = AuditWriter(bad)
    tenant = f"audit-{uid}"
    with pytest.raises(AuditUnavailable) as refused:
        writer.write(_row(tenant, 0), timeout=0.5)
    assert http_status(refused.value) == 503 and refused.value.body()["error"]["code"] == "audit_unavailable"
    assert writer.pending == 1  # the attempt is still recorded once the database is back
    writer.pool = psycopg_pool.ConnectionPool(stack.pg_dsn, min_size=1, max_size=1, open=True)
    assert writer.flush(timeout=30)
    assert [r[0] for r in _rows(stack, tenant)] == ["s0"]
    bad.close()
    writer.pool.close()


# ------------------------------------------------------------ answered => audited, over HTTP

OUTCOMES = {  # source -> (HTTP status, audit status)
    "def run(ctx):\n    return 2.0\n": (200, "ok"),
    "def run(ctx):\n    raise ValueError('no')\n": (200, "error"),
    "import os\ndef run(ctx):\n    os._exit(3)\n": (None, "error"),  # the function dies: a 502 or error
}


@pytest.fixture(scope="module")
def scripts(api):
    u = uuid.uuid4().hex[:8]
    owner = Caller(api, f"aw-{u}", f"aw-tenant-{u}")
    sids = []
    for n, source in enumerate(OUTCOMES):
        sid = owner.sid(f"aw-{n}-{u}")
        owner.create_published(sid, source)
        sids.append(sid)
    return owner, sids


def _rows_of(cfg, call_id: str) -> list[tuple]:
    """The call's rows as they are now: no waiting (the answer came, so the row must be in)."""
    with psycopg.connect(cfg.pg_dsn) as conn:
        return conn.execute("SELECT status, user_id FROM audit WHERE call_id = %s AND action = 'execute'",
                            (call_id,)).fetchall()


@pytest.mark.parametrize("via", ["execute", "function_url"])
def test_every_answered_execute_already_has_its_row(stack, scripts, via):
    owner, sids = scripts
    body = {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": 1356998400.0}
    for sid, (status, audited) in zip(sids, OUTCOMES.values(), strict=True):
        for _ in range(5):  # several: a row lingering a few ms after the answer is caught every time
            call_id = uuid.uuid4().hex
            url = (f"{owner.base}/scripts/{sid}/execute" if via == "execute"
                   else f"{stack.provider_url}/function/{function_name(sid, 1)}")
            resp = requests.post(url, json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {owner.token}", "X-Call-Id": call_id})
            if status is not None:
                assert resp.status_code == status and resp.json()["status"] == audited, resp.text
            assert _rows_of(stack, call_id) == [(audited, owner.user_id)], (sid, resp.status_code, resp.text)


def test_a_denied_execute_already_has_its_row(stack, scripts, api, uid):
    owner, sids = scripts
    stranger = Caller(api, f"mallory-{uid}", owner.tenant)  # same tenant, not entitled
    for url in (f"{api}/scripts/{sids[0]}/execute", f"{stack.provider_url}/function/{function_name(sids[0], 1)}"):
        for _ in range(3):
            call_id = uuid.uuid4().hex
            resp = requests.post(url, json={"instrument_key": "GOOG", "timeframe": "1d"}, timeout=60,
                                 headers={"Authorization": f"Bearer {stranger.token}", "X-Call-Id": call_id})
            assert resp.status_code == 403, resp.text
            assert _rows_of(stack, call_id) == [("denied", stranger.user_id)]
