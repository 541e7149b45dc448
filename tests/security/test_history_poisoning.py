"""Issue 10, item 5: a one-time execute must not write the value of record of an event.

Attacks over the real HTTP path (registry-fn behind the local provider, the version's own
function, gateway-fn): a future as-of time in every form a caller can give it, and `store: true`
racing the realtime publish for the same event. The realtime publisher (what the scheduler calls)
stands in for the realtime path.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import psycopg
import pytest
import redis

from customscripts import db
from customscripts.outputs import OutputRow, OutputStore, params_hash
from customscripts.realtime.publisher import Publisher, latest_key, stream_key
from tests.integration.registry_support import Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

AS_OF = datetime(2013, 1, 2, tzinfo=UTC).timestamp()  # a GOOG bar end inside the sample data
POISON = "def run(ctx):\n    return {'value': 666.0, 'metadata': {'poisoned': 1}}\n"


@pytest.fixture
def alice(api, uid) -> Caller:
    return Caller(api, f"alice-{uid}", f"tenant-{uid}")


@pytest.fixture
def r(stack) -> redis.Redis:
    return redis.Redis(host=stack.redis_host, port=stack.redis_port)


def execute(caller: Caller, script_id: str, **body):
    body.setdefault("instrument_key", "GOOG")
    body.setdefault("timeframe", "1d")
    return caller.call("POST", f"/scripts/{script_id}/execute", body)


def history_rows(stack, tenant: str, script_id: str) -> list[tuple]:
    with psycopg.connect(stack.pg_dsn) as conn:
        return conn.execute("SELECT extract(epoch FROM time)::float8, value FROM script_outputs"
                            " WHERE tenant = %s AND script_id = %s ORDER BY time", (tenant, script_id)).fetchall()


def stream_messages(r: redis.Redis, tenant: str, script_id: str) -> list[dict]:
    return [fields for _id, fields in r.xrange(stream_key(tenant, "GOOG", "1d"))
            if fields[b"indicator"] == f"custom:{script_id}".encode()]


def assert_no_value_of_record(stack, r: redis.Redis, tenant: str, script_id: str) -> None:
    """Nothing in the history, the latest value or the signal stream: the realtime publish's places."""
    assert history_rows(stack, tenant, script_id) == []
    assert r.exists(latest_key(tenant, "GOOG", "1d", script_id, params_hash({}))) == 0
    assert stream_messages(r, tenant, script_id) == []


def future_forms(now: float) -> list[object]:
    """Every way the body can say a time after now (pydantic coerces numeric strings and integers)."""
    ahead = now + 3600
    return [ahead, int(ahead) + 1, f"{ahead}", f"{ahead:.6e}", str(int(ahead)), now + 5, 4_102_444_800,
            4_102_444_800.0, "4102444800"]


def test_future_as_of_times_are_refused_and_write_nothing(alice, uid, stack, r):
    sid = alice.sid(f"future-{uid}")
    alice.create_published(sid, POISON)
    for version in (None, 1):  # latest, and a pinned version: the same check on both paths
        for ts in future_forms(time.time()):
            body = {"timestamp": ts, "store": True} | ({"version": version} if version else {})
            resp = execute(alice, sid, **body)
            assert resp.status_code == 422, (ts, resp.text)
            assert error_code(resp) == "timestamp_in_future", (ts, resp.text)
    # Not JSON numbers at all: rejected by the body parser before anything else looks at them.
    for token in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        raw = b'{"instrument_key":"GOOG","timeframe":"1d","store":true,"timestamp":' + token + b"}"
        resp = alice.call("POST", f"/scripts/{sid}/execute", raw=raw)
        assert resp.status_code in (400, 422), (token, resp.text)
        error_code(resp)
    assert_no_value_of_record(stack, r, alice.tenant, sid)
    with psycopg.connect(stack.pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM onetime_results WHERE script_id = %s", (sid,)).fetchone() == (0,)
    # The present and the past still run.
    assert execute(alice, sid, timestamp=time.time() - 1).json()["status"] == "ok"
    assert execute(alice, sid).json()["status"] == "ok"


def test_store_true_never_writes_history_latest_value_or_stream(alice, uid, stack, r):
    sid = alice.sid(f"store-{uid}")
    alice.create_published(sid, POISON)
    resp = execute(alice, sid, timestamp=AS_OF, store=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok" and body["stored"] is True
    assert_no_value_of_record(stack, r, alice.tenant, sid)
    # ... but the result is kept, for this call, inside the tenant.
    stored = alice.call("GET", f"/executions/{body['call_id']}")
    assert stored.status_code == 200, stored.text
    assert stored.json()["output"] == {"value": 666.0, "timestamp": AS_OF, "metadata": {"poisoned": 1}}
    assert stored.json()["script_id"] == sid and stored.json()["user_id"] == alice.user_id


def test_the_realtime_publish_is_the_value_of_record_for_its_event(alice, uid, stack, r):
    """The original attack: write the event's value first with a one-time execute, then let the
    realtime publish come. History, latest value and every dependent must see the realtime value."""
    sid = alice.sid(f"victim-{uid}")
    alice.create_published(sid, POISON)
    dependent = alice.sid(f"reader-{uid}")
    alice.create_published(dependent, f"def run(ctx):\n    return get_script_output('{sid}')['value']\n",
                           depends_on=[f"{sid}@1"])
    assert execute(alice, sid, timestamp=AS_OF, store=True).json()["stored"] is True
    realtime = OutputRow(time=AS_OF, tenant=alice.tenant, instrument_key="GOOG", timeframe="1d", script_id=sid,
                         version=1, params_hash=params_hash({}), value=42.0, metadata={"realtime": 1})
    Publisher(r, OutputStore(db.pool(stack.pg_dsn))).publish([realtime])
    assert history_rows(stack, alice.tenant, sid) == [(AS_OF, 42.0)]
    latest = r.hget(latest_key(alice.tenant, "GOOG", "1d", sid, params_hash({})), "payload")
    assert json.loads(latest)["value"] == 42.0
    assert [json.loads(m[b"payload"])["value"] for m in stream_messages(r, alice.tenant, sid)] == [42.0]
    read = execute(alice, dependent, timestamp=AS_OF).json()
    assert read["status"] == "ok" and read["output"]["value"] == 42.0, read


def test_a_stored_result_is_read_only_inside_its_tenant_by_entitled_users(api, alice, uid):
    sid = alice.sid(f"kept-{uid}")
    alice.create_published(sid, POISON, permissions={"allowed_users": [f"colleague-{uid}"]})
    call_id = execute(alice, sid, timestamp=AS_OF, store=True).json()["call_id"]
    colleague = Caller(api, f"colleague-{uid}", alice.tenant)
    assert colleague.call("GET", f"/executions/{call_id}").status_code == 200
    unknown = alice.call("GET", f"/executions/no-such-call-{uid}")
    assert unknown.status_code == 404 and error_code(unknown) == "execution_not_found"
    outsiders = [Caller(api, alice.user_id, f"elsewhere-{uid}"),  # same user id, another tenant
                 Caller(api, f"stranger-{uid}", alice.tenant)]  # same tenant, not entitled to the script
    for who in outsiders:
        resp = who.call("GET", f"/executions/{call_id}")
        assert resp.status_code == 404 and error_code(resp) == "execution_not_found", resp.text
        assert resp.json()["error"]["message"].replace(call_id, "X") == \
            unknown.json()["error"]["message"].replace(f"no-such-call-{uid}", "X")
    for bad in ("..", "a/b", "x" * 200, "%00"):
        assert alice.call("GET", f"/executions/{bad}").status_code in (404, 422)


def test_migration_moves_history_written_by_one_time_executes_out_of_the_way(stack, uid):
    """Rows poisoned before the fix (a one-time execute's call id, or a time after now) leave
    script_outputs when migration 007 runs: the realtime publish then writes the value of record.
    Run inside a transaction that is rolled back, so nothing else in the database changes."""
    from pathlib import Path

    import customscripts

    sql = (Path(customscripts.__file__).parent / "migrations" / "007_onetime_results.sql").read_text()
    cleanup = sql[sql.index("-- History written by one-time executes"):]
    tenant, sid = f"t-{uid}", f"s-{uid}"
    row = ("INSERT INTO script_outputs (time, tenant, instrument_key, timeframe, script_id, version, params_hash,"
           " value, call_id) VALUES (to_timestamp(%s), %s, 'GOOG', '1d', %s, 1, 'h', %s, %s)")
    with psycopg.connect(stack.pg_dsn) as conn, conn.transaction(force_rollback=True):
        conn.execute(row, (AS_OF, tenant, sid, 666.0, f"onetime-{uid}"))
        conn.execute(row, (AS_OF - 86400, tenant, sid, 1.0, f"realtime-{uid}"))
        conn.execute(row, (time.time() + 86400 * 365, tenant, sid, 777.0, f"realtime-{uid}"))
        conn.execute("INSERT INTO audit (call_id, script_id, version, user_id, tenant, action, status) VALUES"
                     " (%s, %s, 1, 'mallory', %s, 'execute', 'ok')", (f"onetime-{uid}", sid, tenant))
        conn.execute(cleanup)
        left = conn.execute("SELECT value FROM script_outputs WHERE tenant = %s AND script_id = %s",
                            (tenant, sid)).fetchall()
        kept = conn.execute("SELECT user_id, value FROM onetime_results WHERE tenant = %s AND call_id = %s",
                            (tenant, f"onetime-{uid}")).fetchall()
    assert left == [(1.0,)]
    assert kept == [("mallory", 666.0)]
