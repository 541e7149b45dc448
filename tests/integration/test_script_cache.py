"""The execute path's script-row cache against the real PostgreSQL: rows leave it when any process
changes them (NOTIFY from the scripts trigger), at once when this process does, and it serves
nothing while its LISTEN connection is down."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from customscripts.registry.catalog import Catalog, ScriptCache
from customscripts.registry.models import ScriptMeta
from tests.waiting import wait_until


def _meta(script_id: str, owner: str, tenant: str, version: int | str, name: str) -> ScriptMeta:
    now = datetime.now(UTC)
    return ScriptMeta(script_id=script_id, version=version, owner_id=owner, tenant=tenant, name=name,
                      created_at=now, updated_at=now, status="draft" if version == "draft" else "published",
                      code_sha256="0" * 64)


@pytest.fixture
def catalog(stack) -> Catalog:
    return Catalog(stack)


@pytest.fixture
def script(stack, catalog, uid) -> str:
    meta = _meta(f"cache-{uid}", f"u-{uid}", f"t-{uid}", "draft", "cached")
    with catalog.transaction() as conn:
        assert catalog.insert_script(conn, meta)
    return meta.script_id


def _counting(catalog: Catalog) -> tuple[ScriptCache, list[str]]:
    loads: list[str] = []

    def load(script_id: str):
        loads.append(script_id)
        return catalog.get_script(script_id)

    cache = ScriptCache(catalog.cfg.pg_dsn, load)
    cache.get("warm-up")
    assert wait_until(lambda: cache.live)
    return cache, loads


def test_rows_are_served_from_memory_until_another_process_changes_them(stack, catalog, script):
    cache, loads = _counting(catalog)
    assert cache.get(script).name == "cached"
    assert cache.get(script).name == "cached" and loads.count(script) == 1
    with psycopg.connect(stack.pg_dsn, autocommit=True) as other:  # another replica, or psql
        other.execute("UPDATE scripts SET name = 'renamed', latest_version = 7 WHERE script_id = %s", (script,))
    assert wait_until(lambda: script not in cache.rows)
    row = cache.get(script)
    assert (row.name, row.latest_version) == ("renamed", 7) and loads.count(script) == 2
    with psycopg.connect(stack.pg_dsn, autocommit=True) as other:
        other.execute("DELETE FROM scripts WHERE script_id = %s", (script,))
    assert wait_until(lambda: cache.get(script) is None)


def test_this_process_sees_its_own_changes_at_once(stack, catalog, script):
    row = catalog.scripts.get(script)
    assert row is not None and row.latest_version is None
    meta = _meta(script, row.owner_id, row.tenant, 1, "v1")
    with catalog.transaction() as conn:
        catalog.insert_version(conn, meta, "2" * 64)
    assert catalog.scripts.get(script).latest_version == 1  # no wait: dropped when the transaction ended


def test_nothing_is_served_while_the_listener_is_down(stack, catalog, script):
    cache, loads = _counting(catalog)
    cache.get(script)
    cache.get(script)
    assert loads.count(script) == 1
    with psycopg.connect(stack.pg_dsn, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE query LIKE 'LISTEN %cs_scripts%' AND pid <> pg_backend_pid()").fetchall()
    assert killed
    assert wait_until(lambda: not cache.rows)  # dropped when the connection went (and again on reconnect)
    cache.get(script)  # read through while down, or re-read after the reconnect
    assert loads.count(script) == 2
    assert wait_until(lambda: cache.live)  # back, and serving from memory again
    cache.get(script)
    count = loads.count(script)
    cache.get(script)
    assert loads.count(script) == count
