"""A data store's restart costs the components one reconnect, not an outage: the first execute after
PostgreSQL, Redis or S3 restarts answers ok.

For PostgreSQL that is customscripts/db.py `Pool`: psycopg_pool on its own sleeps 1 s, 2 s, 4 s, ...
between the dead connections it finds after a restart, so a process holding several idle connections
answered 503 (or a script's read failed) for up to 30 s. The checkout bound below is what makes a pool
broken, not a speed figure: with eight dead connections the plain pool's sleeps alone add up to 127 s."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from psycopg_pool import PoolTimeout

from customscripts import db
from customscripts.local import stack as localstack
from tests.integration.registry_support import Caller, error_code
from tests.integration.test_execute_e2e import execute

IDLE = 8
# reads market data through gateway-fn, so an execute needs registry-fn's and gateway-fn's pools
SCRIPT = """
def run(ctx):
    return float(get_market_data(limit=50).close[-1])
"""


def _restart(cfg, service: str) -> None:
    localstack.down(cfg, only={service})
    localstack.up(cfg, only={service})


def _fill(pool: db.Pool, n: int) -> None:
    """Leave n connections idle in the pool, each used once and returned longer than CHECK_IDLE_S ago."""
    with contextlib.ExitStack() as held:
        for conn in [held.enter_context(pool.connection()) for _ in range(n)]:
            conn.execute("SELECT 1")
    time.sleep(db.CHECK_IDLE_S + 0.2)


def test_a_pool_full_of_dead_connections_hands_out_a_live_one(stack):
    pool = db.Pool(stack.pg_dsn, min_size=1, max_size=IDLE, open=True)
    try:
        _fill(pool, IDLE)
        assert pool.get_stats()["pool_available"] == IDLE
        _restart(stack, "postgres")

        with pool.connection(timeout=10) as conn:  # the first checkout after the restart
            assert conn.execute("SELECT 1").fetchone() == (1,)
        stats = pool.get_stats()
        assert stats.get("connections_lost", 0) + stats.get("returns_bad", 0) == IDLE  # every dead one gone
        with contextlib.ExitStack() as held:  # and what the pool holds now works
            conns = [held.enter_context(pool.connection(timeout=10)) for _ in range(IDLE)]
            assert [c.execute("SELECT 1").fetchone() for c in conns] == [(1,)] * IDLE
    finally:
        pool.close()


def test_a_pool_with_the_server_down_fails_the_checkout(stack):
    pool = db.Pool(stack.pg_dsn, min_size=1, max_size=2, open=True)
    try:
        _fill(pool, 2)
        localstack.down(stack, only={"postgres"})
        with pytest.raises(PoolTimeout), pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    finally:
        localstack.up(stack, only={"postgres"})
        pool.close()


@pytest.mark.parametrize("service", ["postgres", "redis", "s3"])
def test_the_first_execute_after_a_restart_succeeds(api, uid, stack, service):
    callers = [Caller(api, f"{name}-{uid}", f"tenant-{name}-{uid}") for name in ("alice", "bob")]
    sids = [c.sid(f"restart-{uid}") for c in callers]
    for caller, sid in zip(callers, sids, strict=True):
        caller.create_published(sid, SCRIPT)
    # eight at once (four per user, their limit): several connections in each component's pool
    calls = [(caller, sid) for caller, sid in zip(callers, sids, strict=True) for _ in range(4)]
    with ThreadPoolExecutor(len(calls)) as workers:
        warmed = list(workers.map(lambda call: execute(*call).json().get("status"), calls))
    assert warmed == ["ok"] * len(calls)
    time.sleep(db.CHECK_IDLE_S + 0.2)
    _restart(stack, service)

    for caller, sid in zip(callers, sids, strict=True):
        resp = execute(caller, sid)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "ok", resp.json()


def test_while_postgres_is_away_the_api_answers_503_and_serves_again_once_it_is_back(api, uid, stack):
    """Each request during the outage fails on its own within CS_PG_WAIT_S (503 `backend_unavailable`
    with Retry-After, nothing half-written); after an outage longer than psycopg_pool's backoff would
    have grown to, the first request once PostgreSQL is back is served (the pool retries a lost
    connection for CS_PG_WAIT_S only, then the next request that needs one connects afresh)."""
    alice = Caller(api, f"alice-{uid}", f"tenant-{uid}")
    sid = alice.sid(f"away-{uid}")
    alice.create_published(sid, SCRIPT)
    assert alice.call("GET", "/subscriptions").status_code == 200
    localstack.down(stack, only={"postgres"})
    try:
        for method, path, body in [("GET", "/scripts", None), ("GET", "/subscriptions", None),
                                   ("POST", "/scripts", {"name": "n", "source": SCRIPT, "script_id": f"lost-{uid}"})]:
            resp = alice.call(method, path, body)
            assert resp.status_code == 503 and error_code(resp) == "backend_unavailable", resp.text
            assert resp.headers.get("Retry-After"), resp.headers
        time.sleep(15)  # the outage goes on: a plain pool's next attempt would now be 16 s away
    finally:
        localstack.up(stack, only={"postgres"})
    resp = alice.call("GET", "/scripts")
    assert resp.status_code == 200, resp.text
    assert execute(alice, sid).json()["status"] == "ok"
    assert alice.call("GET", f"/scripts/lost-{uid}").status_code == 404  # the refused create left nothing
