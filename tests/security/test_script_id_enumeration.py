"""Issue 10, item 8: private script ids cannot be enumerated.

Creating a script under an id another tenant already uses answered 409 while reading it answered
404. Now client-chosen ids are per tenant (customscripts/registry/namespace.py): an outsider sees
no difference in status, body, headers or side effect between an id taken by an invisible script
and a free one, on any route. Marketplace references (by the platform-wide id) and `depends_on`
stay unambiguous; inside a tenant a taken id is still a 409.
"""

from __future__ import annotations

import pytest
import requests

from tests.integration.registry_support import LISTS, RUN_OK, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

# Headers that differ between any two calls whatever they did.
VOLATILE = {"x-call-id", "x-start-time", "x-duration-seconds", "date", "content-length"}


def shape(resp: requests.Response, *ids: str) -> tuple:
    """What an outsider can compare: status, header names (and stable values), body with ids masked."""
    text = resp.text
    for n, value in enumerate(sorted(ids, key=len, reverse=True)):
        text = text.replace(value, f"<id{n}>")
    headers = tuple(sorted((k.lower(), v if k.lower() not in VOLATILE else "*") for k, v in resp.headers.items()))
    return resp.status_code, headers, text


def mask_times(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("created_at", "updated_at", "code_sha256")}


@pytest.fixture
def victim(api, uid) -> Caller:
    return Caller(api, f"victim-{uid}", f"bank-{uid}", features=LISTS)


@pytest.fixture
def outsider(api, uid) -> Caller:
    return Caller(api, f"prober-{uid}", f"rival-{uid}")


def test_creating_a_taken_id_answers_exactly_like_a_free_one(victim, outsider, uid):
    taken, free = f"alpha-{uid}", f"omega-{uid}"
    victim.create_published(taken, "def run(ctx):\n    return 1.5\n")
    a = outsider.create(taken)
    b = outsider.create(free)
    assert a.status_code == b.status_code == 201, (a.text, b.text)
    assert {k.lower() for k in a.headers} == {k.lower() for k in b.headers}
    body_a, body_b = mask_times(a.json()), mask_times(b.json())
    assert body_a.pop("script_id") == outsider.sid(taken) and body_b.pop("script_id") == outsider.sid(free)
    assert body_a.pop("name").replace(taken, "X") == body_b.pop("name").replace(free, "X")
    assert body_a == body_b
    # Side effects: the outsider has its own script under that id; the victim's is untouched.
    mine = outsider.call("GET", f"/scripts/{taken}")
    assert mine.status_code == 200 and mine.json()["source"] == RUN_OK
    theirs = victim.call("GET", f"/scripts/{taken}")
    assert theirs.json()["source"] == "def run(ctx):\n    return 1.5\n" and theirs.json()["latest_version"] == 1
    # Publishing, executing and reading the outsider's copy never touch the victim's script.
    assert outsider.publish(taken).status_code == 201
    ran = outsider.call("POST", f"/scripts/{taken}/execute", {"instrument_key": "GOOG", "timeframe": "1d"})
    assert ran.json()["output"]["value"] == 1.0 and ran.json()["script_id"] == outsider.sid(taken)
    # Inside a tenant a taken id is a plain 409.
    colleague = Caller(victim.base, f"colleague-{uid}", victim.tenant)
    again = colleague.create(taken)
    assert again.status_code == 409 and error_code(again) == "script_id_taken"


def test_every_route_answers_alike_for_another_tenants_private_id_and_a_free_one(victim, outsider, uid):
    private = victim.sid(f"secret-{uid}")
    victim.create_published(private, permissions={"allowed_users": [outsider.user_id]})
    missing = victim.sid(f"nothing-{uid}")  # the same namespace, never created
    routes = [("GET", "/scripts/{}"), ("PUT", "/scripts/{}"), ("PATCH", "/scripts/{}"),
              ("POST", "/scripts/{}/publish"), ("GET", "/scripts/{}/versions"), ("GET", "/scripts/{}/versions/1"),
              ("GET", "/scripts/{}/versions/draft"), ("POST", "/scripts/{}/marketplace/subscribe"),
              ("POST", "/scripts/{}/execute"), ("POST", "/scripts/{}/subscribe"),
              ("DELETE", "/scripts/{}/subscriptions/1"), ("GET", "/signals/GOOG/custom/{}?timeframe=1d")]
    bodies = {"PUT": {"description": "x"}, "PATCH": {"description": "x"}}
    for method, template in routes:
        body = bodies.get(method) or ({"instrument_key": "GOOG", "timeframe": "1d"} if "scribe" in template
                                      or "execute" in template else None)
        one = outsider.call(method, template.format(private), body)
        two = outsider.call(method, template.format(missing), body)
        assert shape(one, private) == shape(two, missing), (method, template, one.text, two.text)
        assert one.status_code == 404, (method, template, one.text)
    # As a dependency and as a subscription filter: the same answer too.
    dep_one = outsider.create(f"d1-{uid}", depends_on=[f"{private}@1"])
    dep_two = outsider.create(f"d2-{uid}", depends_on=[f"{missing}@1"])
    assert shape(dep_one, private) == shape(dep_two, missing)
    flt_one = outsider.call("GET", f"/subscriptions?script_id={private}")
    flt_two = outsider.call("GET", f"/subscriptions?script_id={missing}")
    assert shape(flt_one, private) == shape(flt_two, missing)
    # Choosing the other tenant's platform-wide id as one's own id creates one's own script.
    made = outsider.create(private)
    assert made.status_code == 201 and made.json()["script_id"] == outsider.sid(private) != private
    assert victim.call("GET", f"/scripts/{private}").json()["owner_id"] == victim.user_id


def test_marketplace_references_and_dependencies_stay_unambiguous(victim, outsider, uid):
    listed = victim.sid(f"signal-{uid}")
    victim.create_published(listed, "def run(ctx):\n    return 7.0\n", permissions={"marketplace": True})
    # The outsider uses the same chosen id for a script of its own ...
    outsider.create_published(f"signal-{uid}", "def run(ctx):\n    return 3.0\n")
    # ... and still reaches the listed one by its platform-wide id, and its own by the bare id.
    assert outsider.call("POST", f"/scripts/{listed}/marketplace/subscribe").status_code == 201
    body = {"instrument_key": "GOOG", "timeframe": "1d"}
    listed_run = outsider.call("POST", f"/scripts/{listed}/execute", body).json()
    own_run = outsider.call("POST", f"/scripts/signal-{uid}/execute", body).json()
    assert (listed_run["script_id"], listed_run["output"]["value"]) == (listed, 7.0)
    assert (own_run["script_id"], own_run["output"]["value"]) == (outsider.sid(f"signal-{uid}"), 3.0)
    # depends_on given with the bare id is stored with the platform-wide id of the owner's own script.
    dependent = outsider.create(f"uses-{uid}", depends_on=[f"signal-{uid}@1"]).json()
    assert dependent["depends_on"] == [f"{outsider.sid(f'signal-{uid}')}@1"]
