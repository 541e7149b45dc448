"""A version's function URL, called with the user's own bearer token, answers exactly as the registry's
`POST /scripts/{id}/execute`: the same status and error code for every kind of caller, the same answer,
and the same audit row; synchronously and through `/async-function/` with a callback on loopback.

Real stack: the provider, registry-fn, gateway-fn and each version's function process.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from dataclasses import dataclass

import psycopg
import pytest
import requests

from customscripts.config import Settings
from customscripts.faas.naming import function_name
from customscripts.http import Event, LocalServer
from tests.integration.registry_support import LISTS, Caller, error_code
from tests.integration.test_execute_e2e import AS_OF

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

SCRIPT = "def run(ctx):\n    return float(get_market_data(limit=5).close[-1]) + float(ctx.params.get('k', 0))\n"
BODY = {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": AS_OF, "params": {"k": 1}}


@dataclass
class World:
    cfg: Settings
    u: str
    owner: Caller
    listed: str
    private: str
    revoked: str  # v1 allowed `revoked-<u>`; v2 (the current policy) no longer does


def _call(caller: Caller, url: str, body: dict, call_id: str, token: str | None = None) -> requests.Response:
    token = caller.token if token is None else token
    return requests.post(url, json=body, timeout=60,
                         headers={"Authorization": f"Bearer {token}", "X-Call-Id": call_id})


def fn_url(w: World, script_id: str) -> str:
    return f"{w.cfg.provider_url}/function/{function_name(script_id, 1)}"


@pytest.fixture(scope="module")
def world(stack: Settings, api: str) -> World:
    u = uuid.uuid4().hex[:8]
    owner = Caller(api, f"owner-{u}", f"acme-{u}", features=LISTS)
    grants = {"teams": [f"quants-{u}"], "orgs": [f"desk-{u}"], "allowed_users": [f"allowed-{u}"]}
    listed, private, revoked = (owner.sid(f"{n}-{u}") for n in ("listed", "private", "revoked"))
    owner.create_published(listed, SCRIPT, permissions={**grants, "marketplace": True})
    owner.create_published(private, SCRIPT, permissions=grants)
    owner.create_published(revoked, SCRIPT, permissions={"allowed_users": [f"revoked-{u}"]})
    assert owner.call("PUT", f"/scripts/{revoked}", {"permissions": {}}).status_code == 200
    assert owner.publish(revoked).status_code == 201
    w = World(stack, u, owner, listed, private, revoked)
    subscriber = persona(w, "subscriber")
    assert subscriber.call("POST", f"/scripts/{listed}/marketplace/subscribe").status_code == 201
    for sid in (listed, private, revoked):  # deployed, so their function URLs answer
        assert owner.call("POST", f"/scripts/{sid}/execute", {**BODY, "version": 1}).status_code == 200
    return w


def persona(w: World, name: str) -> Caller:
    u, acme, other, base = w.u, w.owner.tenant, f"globex-{w.u}", w.owner.base
    return {
        "owner": w.owner,
        "team_member": Caller(base, f"tm-{u}", acme, teams=(f"quants-{u}",)),
        "org_member": Caller(base, f"om-{u}", acme, orgs=(f"desk-{u}",)),
        "allowed_user": Caller(base, f"allowed-{u}", acme),
        "subscriber": Caller(base, f"sub-{u}", other),
        "other_tenant": Caller(base, f"stranger-{u}", other),
        "tier_without_feature": Caller(base, f"cheap-{u}", acme, tier="free", teams=(f"quants-{u}",)),
        "revoked_user": Caller(base, f"revoked-{u}", acme),
    }[name]


def audit_rows(cfg: Settings, call_id: str, at_least: int = 1, patience_s: float = 1.0) -> list[tuple]:
    """The call's audit rows once `at_least` are there, or what is there after a bounded wait (rows are
    written just after the answer; a refusal before any check leaves none)."""
    rows: list[tuple] = []
    deadline = time.monotonic() + patience_s
    while True:
        with psycopg.connect(cfg.pg_dsn) as conn:
            rows[:] = conn.execute("SELECT action, status, user_id, tenant, script_id, version, params_hash,"
                                   " output_hash, detail FROM audit WHERE call_id = %s ORDER BY id",
                                   (call_id,)).fetchall()
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


CALLERS = ["owner", "team_member", "org_member", "allowed_user", "subscriber", "other_tenant",
           "tier_without_feature", "revoked_user"]


@pytest.mark.parametrize("script", ["listed", "private", "revoked"])
@pytest.mark.parametrize("name", CALLERS)
def test_function_url_answers_as_the_registry_does(world: World, name: str, script: str) -> None:
    caller = persona(world, name)
    sid = getattr(world, script)
    via_registry = _call(caller, f"{caller.base}/scripts/{sid}/execute", {**BODY, "version": 1}, f"reg-{uuid.uuid4()}")
    via_function = _call(caller, fn_url(world, sid), BODY, f"fn-{uuid.uuid4()}")
    assert via_function.status_code == via_registry.status_code, (via_registry.text, via_function.text)
    if via_registry.status_code == 200:
        a, b = via_registry.json(), via_function.json()
        assert b["status"] == a["status"] == "ok"
        assert b["output"] == a["output"] and b["params_hash"] == a["params_hash"]
        assert {k: b[k] for k in ("script_id", "version", "instrument_key", "timeframe")} == \
               {k: a[k] for k in ("script_id", "version", "instrument_key", "timeframe")}
    else:
        assert error_code(via_function) == error_code(via_registry)
    reg_rows = audit_rows(world.cfg, via_registry.request.headers["X-Call-Id"])
    fn_rows = audit_rows(world.cfg, via_function.request.headers["X-Call-Id"], max(1, len(reg_rows)))
    assert fn_rows == reg_rows
    if via_registry.status_code == 200:
        assert [r[1] for r in reg_rows] == ["ok"]


def test_a_token_of_nobody_is_refused_before_any_work(world: World) -> None:
    resp = _call(world.owner, fn_url(world, world.listed), BODY, f"fn-{uuid.uuid4()}", token="a.b.c")
    assert resp.status_code == 401
    assert error_code(resp) == world.owner.call("POST", f"/scripts/{world.listed}/execute", BODY,
                                                token="a.b.c").json()["error"]["code"]


def test_a_user_cannot_use_a_function_url_to_run_another_version(world: World) -> None:
    resp = _call(world.owner, fn_url(world, world.revoked), {**BODY, "version": 2}, f"fn-{uuid.uuid4()}")
    assert resp.status_code == 422 and error_code(resp) == "wrong_version"


def test_the_registry_steps_refuse_anyone_but_the_function(world: World) -> None:
    """The internal routes the function reaches through gateway-fn: a user (even the owner) cannot get
    an execution token or write an audit row with them, directly or through gateway-fn."""
    name = function_name(world.listed, 1)
    asked = {"script_id": world.listed, "version": 1, "body": BODY}
    for base in (world.owner.base, f"http://127.0.0.1:{world.cfg.gateway_fn_port}"):
        for step, body in (("authorise", asked), ("complete", {"grant": "x.y", "result": {"status": "ok"}})):
            resp = requests.post(f"{base}/functions/{name}/{step}", json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {world.owner.token}",
                                          "X-Function-Proof": "forged.proof"})
            assert resp.status_code == 401, (base, step, resp.text)
            assert "execution_token" not in resp.text


def test_async_invocation_calls_back_with_the_same_answer(world: World) -> None:
    received: queue.Queue = queue.Queue()

    def callback(event: Event, _context: object) -> dict:
        received.put((dict(event.headers.items()), event.body))
        return {"statusCode": 200, "body": ""}

    server = LocalServer(callback).start()
    try:
        call_id = f"async-{uuid.uuid4()}"
        resp = requests.post(fn_url(world, world.private).replace("/function/", "/async-function/"), json=BODY,
                             timeout=30, headers={"Authorization": f"Bearer {world.owner.token}",
                                                  "X-Call-Id": call_id, "X-Callback-Url": server.url + "/done"})
        assert resp.status_code == 202
        headers, body = received.get(timeout=60)
    finally:
        server.stop()
    answer = json.loads(body)
    assert answer["status"] == "ok" and answer["call_id"] == call_id
    sync = _call(world.owner, fn_url(world, world.private), BODY, f"fn-{uuid.uuid4()}").json()
    assert answer["output"] == sync["output"]
    assert {k.lower(): v for k, v in headers.items()}.get("x-call-id") == call_id
    assert [r[1] for r in audit_rows(world.cfg, call_id, 1, patience_s=30)] == ["ok"]


def test_the_version_and_the_listing_name_the_function_url(world: World) -> None:
    url = fn_url(world, world.private)
    owner = world.owner
    assert owner.call("GET", f"/scripts/{world.private}/versions/1").json()["function_url"] == url
    assert [v["function_url"] for v in owner.call("GET", f"/scripts/{world.private}/versions").json()["versions"]] \
        == [url]
    listed = {s["script_id"]: s for s in owner.call("GET", "/scripts?mine=true&limit=200").json()["scripts"]}
    assert listed[world.private]["function_url"] == url
    assert listed[world.revoked]["function_url"].endswith(function_name(world.revoked, 2))  # the latest
