"""One-time execution end to end on the real stack: registry-fn and gateway-fn behind the local
provider, each published version running as its own function with the sandboxed supervisor."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import psycopg
import pytest

from customscripts.bartime import bar_end
from customscripts.marketdata.loader import read_csv, sample_csv
from tests.integration.registry_support import LISTS, Caller, error_code
from tests.waiting import wait_until

AS_OF = datetime(2013, 1, 2, tzinfo=UTC).timestamp()  # a GOOG trading day inside the sample

RSI_SCRIPT = """
import numpy as np

def run(ctx):
    period = int(ctx.params.get("period", 14))
    close = np.asarray(get_market_data(limit=200).close, dtype=float)
    delta = np.diff(close)
    gain = np.clip(delta, 0, None)
    loss = np.clip(-delta, 0, None)
    avg_gain, avg_loss = gain[:period].mean(), loss[:period].mean()
    for g, l in zip(gain[period:], loss[period:]):
        avg_gain = (avg_gain * (period - 1) + g) / period
        avg_loss = (avg_loss * (period - 1) + l) / period
    return {"value": float(100 - 100 / (1 + avg_gain / avg_loss)), "metadata": {"bars": len(close)}}
"""


def reference_rsi(closes: list[float], period: int) -> float:
    """Wilder's RSI written independently of the script (plain Python, no numpy)."""
    gains = [max(b - a, 0.0) for a, b in itertools.pairwise(closes)]
    losses = [max(a - b, 0.0) for a, b in itertools.pairwise(closes)]
    avg_gain = sum(gains[:period]) / period
    avg_loss = sum(losses[:period]) / period
    for gain, loss in zip(gains[period:], losses[period:], strict=True):
        avg_gain = (avg_gain * (period - 1) + gain) / period
        avg_loss = (avg_loss * (period - 1) + loss) / period
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)


@pytest.fixture
def alice(api, uid) -> Caller:
    return Caller(api, f"alice-{uid}", f"tenant-{uid}")


def execute(caller: Caller, script_id: str, **body):
    body.setdefault("instrument_key", "GOOG")
    body.setdefault("timeframe", "1d")
    body.setdefault("timestamp", AS_OF)
    return caller.call("POST", f"/scripts/{script_id}/execute", body)


def audit_rows(cfg, script_id: str, expect: int = 1) -> list[tuple]:
    """The script's execute audit rows, once `expect` are there (they are written just after the
    reply, registry/audit.py); bounded wait."""
    rows: list[tuple] = []

    def enough() -> bool:
        with psycopg.connect(cfg.pg_dsn) as conn:
            rows[:] = conn.execute("SELECT action, status, user_id, version, params_hash, output_hash, duration_ms"
                                   " FROM audit WHERE script_id = %s AND action = 'execute' ORDER BY id",
                                   (script_id,)).fetchall()
        return len(rows) >= expect

    wait_until(enough, interval=0.02)
    return rows


def test_execute_returns_the_scripts_value_in_indicator_shape(alice, uid, stack):
    sid = alice.sid(f"const-{uid}")
    alice.create_published(sid, "def run(ctx):\n    return {'value': 41.5, 'metadata': {'k': 1}}\n")
    resp = execute(alice, f"const-{uid}")  # the id as chosen: it names the script in alice's tenant
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok"
    assert body["output"] == {"value": 41.5, "timestamp": AS_OF, "metadata": {"k": 1}}
    assert body["version"] == 1 and body["metrics"]["memory_mb"] > 0
    assert body["script_id"] == sid and body["call_id"] == resp.headers["X-Call-Id"]
    (row,) = audit_rows(stack, sid)
    assert row[:4] == ("execute", "ok", f"alice-{uid}", 1) and row[4] and row[5]


def test_rsi_on_goog_equals_an_independent_implementation(alice, uid):
    alice.create_published(f"rsi-{uid}", RSI_SCRIPT)
    resp = execute(alice, f"rsi-{uid}", params={"period": 14})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok", body
    # the bars that have closed by AS_OF: each is visible from its end (customscripts/bartime.py)
    bars = [row for row in read_csv(sample_csv("GOOG.csv")) if bar_end(row.time.timestamp(), "1d") <= AS_OF][-200:]
    expected = reference_rsi([float(row.close) for row in bars], 14)
    assert body["output"]["metadata"] == {"bars": 200}
    assert math.isclose(body["output"]["value"], expected, rel_tol=1e-9)


def test_script_reads_its_dependencys_output(alice, uid, stack):
    """A dependency's output is what realtime published for the event (the value of record)."""
    import redis

    from customscripts import db
    from customscripts.outputs import OutputRow, OutputStore, params_hash
    from customscripts.realtime.publisher import Publisher

    base = alice.sid(f"base-{uid}")
    alice.create_published(base, "def run(ctx):\n    return 7.25\n")
    publisher = Publisher(redis.Redis(host=stack.redis_host, port=stack.redis_port), OutputStore(db.pool()))
    publisher.publish([OutputRow(time=AS_OF, tenant=alice.tenant, instrument_key="GOOG", timeframe="1d",
                                 script_id=base, version=1, params_hash=params_hash({}), value=7.25)])
    alice.create_published(
        f"dependent-{uid}",
        f"def run(ctx):\n    return get_script_output('{base}')['value'] * 2\n",
        depends_on=[f"base-{uid}@1"],  # the bare chosen id resolves in alice's tenant
    )
    body = execute(alice, f"dependent-{uid}").json()
    assert body["status"] == "ok", body
    assert body["output"]["value"] == 14.5


def test_dependency_without_output_fails_naming_it(alice, uid, stack):
    empty, needs = alice.sid(f"empty-{uid}"), alice.sid(f"needs-{uid}")
    alice.create_published(empty, "def run(ctx):\n    return 1.0\n")
    alice.create_published(
        needs, f"def run(ctx):\n    return get_script_output('{empty}')['value']\n",
        depends_on=[f"{empty}@1"],
    )
    body = execute(alice, needs).json()
    assert body["status"] == "dependency_failed"
    assert empty in body["error"]["message"]
    assert audit_rows(stack, needs)[-1][1] == "dependency_failed"


def test_timeout_gives_timeout_status_and_audit_row(alice, uid, stack):
    alice.create_published(f"slow-{uid}", "def run(ctx):\n    while True:\n        pass\n",
                           limits={"timeout_ms": 200})
    body = execute(alice, f"slow-{uid}").json()
    assert body["status"] == "timeout"
    assert body["output"] is None
    assert audit_rows(stack, alice.sid(f"slow-{uid}"))[-1][1] == "timeout"
    # the function keeps serving after the kill
    alice.create_published(f"after-{uid}", "def run(ctx):\n    return 3.0\n")
    assert execute(alice, f"after-{uid}").json()["status"] == "ok"


def test_invalid_output_is_rejected_and_never_stored(alice, uid, stack):
    alice.create_published(f"bad-{uid}", "def run(ctx):\n    return {'value': 'not a number'}\n",
                           output_schema={"type": "object", "properties": {"value": {"type": "number"}}})
    body = execute(alice, f"bad-{uid}", store=True).json()
    assert body["status"] == "invalid_output" and body["stored"] is False
    assert audit_rows(stack, alice.sid(f"bad-{uid}"))[-1][1] == "invalid_output"
    with psycopg.connect(stack.pg_dsn) as conn:
        for table in ("script_outputs", "onetime_results"):
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE script_id = %s",
                                (alice.sid(f"bad-{uid}"),)).fetchone() == (0,)


def test_denied_execution_is_403_with_an_audit_row_and_no_function(alice, uid, stack, api):
    alice.create_published(f"private-{uid}", "def run(ctx):\n    return 1.0\n")
    mallory = Caller(api, f"mallory-{uid}", f"tenant-{uid}")  # same tenant, not entitled
    resp = execute(mallory, f"private-{uid}")
    assert resp.status_code == 403 and error_code(resp) == "not_entitled"
    assert audit_rows(stack, alice.sid(f"private-{uid}"))[-1][:3] == ("execute", "denied", f"mallory-{uid}")
    from customscripts.faas.client import OpenFaaSClient
    from customscripts.faas.naming import function_name

    with OpenFaaSClient(stack.provider_url, stack.openfaas_user, stack.openfaas_password) as client:
        assert not client.exists(function_name(alice.sid(f"private-{uid}"), 1))


def test_unlisting_a_script_stops_outsiders_at_once(uid, api):
    """registry-fn keeps script rows in memory for execute; a publish that takes a script off the
    marketplace must stop another tenant's subscriber on the very next call, not a cache later."""
    author = Caller(api, f"author-{uid}", f"vendor-{uid}", features=LISTS)
    buyer = Caller(api, f"buyer-{uid}", f"buyer-tenant-{uid}")
    sid = author.sid(f"listed-{uid}")
    author.create_published(sid, "def run(ctx):\n    return 2.0\n", permissions={"marketplace": True})
    assert buyer.call("POST", f"/scripts/{sid}/marketplace/subscribe").status_code == 201
    for _ in range(3):  # the row is cached from here on
        assert execute(buyer, sid).json()["status"] == "ok"
    assert author.call("PATCH", f"/scripts/{sid}", {"permissions": {"marketplace": False}}).status_code == 200
    assert author.publish(sid).status_code == 201  # v2, unlisted, is now the latest
    resp = execute(buyer, sid)
    assert resp.status_code in (403, 404), resp.text
    assert execute(author, sid).json()["version"] == 2


def test_params_are_checked_against_the_input_schema(alice, uid):
    alice.create_published(f"typed-{uid}", "def run(ctx):\n    return float(ctx.params['period'])\n",
                           input_schema={"type": "object", "properties": {"period": {"type": "integer"}},
                                         "required": ["period"]})
    resp = execute(alice, f"typed-{uid}", params={"period": "fourteen"})
    assert resp.status_code == 422 and error_code(resp) == "invalid_params"
    assert execute(alice, f"typed-{uid}", params={"period": 14}).json()["output"]["value"] == 14.0


def test_unknown_script_and_bad_bodies(alice, uid):
    assert execute(alice, f"nope-{uid}").status_code == 404
    alice.create_published(f"x-{uid}")
    assert execute(alice, f"x-{uid}", instrument_key="../etc").status_code == 422
    assert execute(alice, f"x-{uid}", surprise=1).status_code == 422
    assert alice.call("POST", f"/scripts/x-{uid}/execute", raw=b"[1").status_code == 400
    assert alice.call("POST", f"/scripts/x-{uid}/execute", token="").status_code == 401


def test_function_budget_of_three_runs_five_versions_in_turn(stack, uid, api):
    """Five versions, budget 3: every execute succeeds; at most 3 script functions ever deployed."""
    import redis

    from customscripts import db
    from customscripts.app import app
    from customscripts.auth import decode_token, issue_user_token
    from customscripts.execution import Executor, Invoker
    from customscripts.faas.budget import FunctionBudget, RedisLru
    from customscripts.faas.client import OpenFaaSClient
    from customscripts.outputs import OnetimeResults
    from customscripts.registry.concurrency import ExecuteSlots

    owner = Caller(api, f"budget-{uid}", f"tenant-{uid}")
    script_ids = [owner.sid(f"b{i}-{uid}") for i in range(5)]
    for i, sid in enumerate(script_ids):
        owner.create_published(sid, f"def run(ctx):\n    return {i}.0\n")
    client = OpenFaaSClient(stack.provider_url, stack.openfaas_user, stack.openfaas_password)
    for fn in client.list():  # start from no script functions so the count is ours alone
        if (fn.get("labels") or {}).get("com.customscripts.kind") == "script":
            client.delete(fn["name"])
    lru = RedisLru(redis.Redis(host=stack.redis_host, port=stack.redis_port), key=f"test:lru:{uid}",
                   lock_key=f"test:lru-lock:{uid}")
    budget = FunctionBudget(client, budget=3, lru=lru, cache_s=0)
    executor = Executor(Invoker(app().registry, client, budget), OnetimeResults(db.pool()), ExecuteSlots(stack))
    principal = decode_token(issue_user_token(owner.user_id, owner.tenant))
    most = 0
    for round_ in range(2):
        for i, sid in enumerate(script_ids):
            result = executor.execute(principal, sid, {"instrument_key": "GOOG", "timeframe": "1d",
                                                       "timestamp": AS_OF}, f"budget-{uid}-{round_}-{i}")
            assert result["status"] == "ok" and result["output"]["value"] == float(i)
            most = max(most, len(budget.deployed()))
    assert most == 3


BOOLEANS = [  # `true` where a number belongs: a lax parser reads it as 1 (a series from 1970, version 1)
    ("execute", "timestamp", True), ("execute", "version", True), ("execute", "version", False),
    ("series", "start", True), ("series", "end", False), ("series", "version", True),
    ("subscribe", "backfill", True), ("subscribe", "version", True),
]


@pytest.mark.parametrize(("route", "field", "value"), BOOLEANS)
def test_evaluation_bodies_take_no_boolean_for_a_number(alice, uid, stack, route, field, value):
    """execute, series and subscribe bodies: 422 `invalid_body` naming the field, and nothing ran (no
    audit row, no subscription). Numeric strings stay accepted, as they always were."""
    sid = alice.sid(f"strict-{uid}")
    alice.create_published(sid, "def run(ctx):\n    return 1.0\n", runtime_mode="realtime")
    body = {"instrument_key": "GOOG", "timeframe": "1d", field: value}
    if route == "series" and field != "start":
        body["start"] = AS_OF
    resp = alice.call("POST", f"/scripts/{sid}/{route}", body)
    assert resp.status_code == 422 and error_code(resp) == "invalid_body", resp.text
    assert [d["loc"] for d in resp.json()["error"]["details"]] == [[field]], resp.text
    with psycopg.connect(stack.pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM audit WHERE script_id = %s AND action NOT IN "
                            "('create_draft', 'publish')", (sid,)).fetchone() == (0,)
    assert [s for s in alice.call("GET", "/subscriptions").json()["subscriptions"] if s["script_id"] == sid] == []


def test_a_numeric_string_is_still_a_number(alice, uid):
    sid = alice.sid(f"numstr-{uid}")
    alice.create_published(sid, "def run(ctx):\n    return 2.0\n")
    resp = execute(alice, sid, timestamp=str(AS_OF), version="1")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "ok" and resp.json()["output"]["timestamp"] == AS_OF
