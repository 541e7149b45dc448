"""Text no store can keep: NUL (PostgreSQL text and jsonb refuse it) and lone UTF-16 surrogates (UTF-8
cannot encode them), both of which JSON carries as escapes.

Attacks over the real HTTP path: a caller puts them in every body field that is stored (each is a 422
naming the field, with nothing written, never a 500) and in a JSON query parameter (never a 5xx); a
hostile script puts them in its output (`invalid_output`) and in its error messages (recorded with the
characters replaced, and the audit trail keeps working for everyone after it). The realtime
dead-letter table is written with such an error too.
"""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urlencode

import psycopg
import pytest

from customscripts import db
from customscripts.outputs import OutputStore
from customscripts.realtime.publisher import DeadLetter, Publisher
from tests.integration.registry_support import Caller

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

BAD = ["a\u0000b", "\ud800", "x\udfff"]
OK_SCRIPT = "def run(ctx):\n    return 1.0\n"


@pytest.fixture
def alice(api, uid) -> Caller:
    return Caller(api, f"alice-{uid}", f"tenant-{uid}")


def audit_rows(stack, call_id: str) -> list[tuple]:
    with psycopg.connect(stack.pg_dsn) as conn:
        return conn.execute("SELECT status, detail FROM audit WHERE call_id = %s", (call_id,)).fetchall()


@pytest.mark.parametrize("bad", BAD)
def test_a_caller_cannot_send_unstorable_text_anywhere(alice, uid, bad) -> None:
    sid = alice.sid(f"txt-{uuid.uuid4().hex[:6]}")
    alice.create_published(sid, OK_SCRIPT)
    series = {"instrument_key": "GOOG", "timeframe": "1d", "start": 1.6e9, "end": 1.6e9 + 86400 * 5}
    attempts = [
        ("POST", "/scripts", {"name": bad, "script_id": f"n-{uuid.uuid4().hex[:6]}", "source": OK_SCRIPT}),
        ("POST", "/scripts", {"name": "n", "script_id": f"s-{uuid.uuid4().hex[:6]}", "source": OK_SCRIPT,
                              "description": bad}),
        ("PATCH", f"/scripts/{sid}", {"description": bad}),
        ("POST", f"/scripts/{sid}/versions/1/deprecate", {"reason": bad}),
        ("POST", f"/scripts/{sid}/subscribe", {"instrument_key": "GOOG", "timeframe": "1d", "params": {"k": bad},
                                                "backfill": 0}),
        ("POST", f"/scripts/{sid}/subscribe", {"instrument_key": "GOOG", "timeframe": "1d", "params": {bad: 1},
                                                "backfill": 0}),
        ("POST", f"/scripts/{sid}/execute", {"instrument_key": "GOOG", "timeframe": "1d", "params": {"k": [bad]},
                                              "store": True}),
        ("POST", f"/scripts/{sid}/series", {**series, "params": {"k": bad}}),
    ]
    for method, path, body in attempts:
        resp = alice.call(method, path, body)
        assert resp.status_code == 422, (method, path, resp.text)
    query = urlencode({"timeframe": "1d", "params": json.dumps({"k": bad})})
    resp = alice.call("GET", f"/signals/GOOG/custom/{sid}?{query}")
    assert resp.status_code < 500, resp.text  # a params hash like any other: nothing stored under it
    # nothing was written: no subscription, the version not deprecated
    assert alice.call("GET", "/subscriptions").json()["subscriptions"] == []
    assert not alice.call("GET", f"/scripts/{sid}/versions").json()["versions"][0].get("deprecated")


def test_an_escaped_backslash_is_ordinary_text(alice) -> None:
    """`\\\\u0000` in JSON is a backslash and five characters, which every store keeps."""
    sid = alice.sid(f"txt-{uuid.uuid4().hex[:6]}")
    alice.create_published(sid, OK_SCRIPT)
    resp = alice.call("POST", f"/scripts/{sid}/versions/1/deprecate", {"reason": "\\u0000 and \\ud800"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("bad", BAD)
def test_a_script_cannot_output_unstorable_text(alice, bad) -> None:
    sid = alice.sid(f"out-{uuid.uuid4().hex[:6]}")
    alice.create_published(sid, f"def run(ctx):\n    return {{'value': 1.0, 'metadata': {{'m': {bad!r}}}}}\n")
    for store in (False, True):
        resp = alice.call("POST", f"/scripts/{sid}/execute", {"instrument_key": "GOOG", "timeframe": "1d",
                                                              "store": store})
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "invalid_output", resp.text


@pytest.mark.parametrize("bad", BAD)
def test_a_scripts_error_text_is_recorded_and_the_audit_trail_goes_on(stack, alice, bad) -> None:
    sid = alice.sid(f"err-{uuid.uuid4().hex[:6]}")
    alice.create_published(sid, f"def run(ctx):\n    raise ValueError({bad!r} * 3)\n")
    resp = alice.call("POST", f"/scripts/{sid}/execute", {"instrument_key": "GOOG", "timeframe": "1d"})
    assert resp.status_code == 200 and resp.json()["status"] == "error", resp.text
    rows = audit_rows(stack, resp.json()["call_id"])
    assert len(rows) == 1 and rows[0][0] == "error" and "\ufffd" in rows[0][1], rows
    # and the next caller's attempt is audited as usual
    ok = alice.sid(f"ok-{uuid.uuid4().hex[:6]}")
    alice.create_published(ok, OK_SCRIPT)
    resp = alice.call("POST", f"/scripts/{ok}/execute", {"instrument_key": "GOOG", "timeframe": "1d"})
    assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text
    assert [r[0] for r in audit_rows(stack, resp.json()["call_id"])] == ["ok"]


def test_a_dead_letter_with_unstorable_error_text_is_recorded(stack, uid) -> None:
    import redis

    publisher = Publisher(redis.Redis(host=stack.redis_host, port=stack.redis_port), OutputStore(db.pool()))
    letter = DeadLetter(f"t-{uid}", "u", f"s-{uid}", 1, "0" * 16, "GOOG", "1d", time.time(), "invocation_failed",
                        "boom \u0000 \ud800", 3, uuid.uuid4().hex)
    publisher.dead_letter([letter])
    with psycopg.connect(stack.pg_dsn) as conn:
        stored = conn.execute("SELECT error FROM realtime_dead_letters WHERE call_id = %s",
                              (letter.call_id,)).fetchall()
    assert stored == [("boom \ufffd \ufffd",)]
