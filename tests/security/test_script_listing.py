"""GET /scripts never shows what the caller may not see, and deprecation holds, over real HTTP.

The listing's rows pass the same visibility and use checks as every read (registry/service.py
`_listed_access`): another tenant's private scripts never appear, whatever the filters, the cursor
or the caller's claims (same user id, same team names as the other tenant); marketplace scripts
appear once the caller is entitled (subscribed) and go when the author unlists; shared scripts
appear to those they are shared with and go when a newer version revokes them (permissions rule 7);
drafts only to their owner. Deprecation: only the owner deprecates; no new subscriptions to a
deprecated version (409), running ones go on, the listing shows it.
"""

from __future__ import annotations

import uuid

import pytest

from customscripts.app import app
from customscripts.realtime.events import Event
from tests.integration.realtime_support import drop_subscriptions
from tests.integration.registry_support import LISTS, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

AT = 1357084800.0  # the close of 2013-01-02 in the GOOG sample
GOOG = {"instrument_key": "GOOG", "timeframe": "1d"}


def listing(caller: Caller, **query) -> list[dict]:
    """Every page of the caller's listing (with `query`), through the client."""
    return list(caller.client.iter_scripts(**query))


def ids_of(rows: list[dict]) -> list[str]:
    return [r["script_id"] for r in rows]


FILTERS = [{}, {"mine": False}, {"marketplace": False}, {"marketplace": True}, {"status": "published"},
           {"status": "draft"}, {"runtime_mode": "onetime"}, {"limit": 1}, {"limit": 200}]


def test_another_tenants_private_scripts_never_appear(api, uid):
    owner = Caller(api, f"quant-{uid}", f"acme-{uid}", teams=(f"quants-{uid}",), orgs=(f"desk-{uid}",))
    grants = {"teams": [f"quants-{uid}"], "orgs": [f"desk-{uid}"], "allowed_users": [f"quant-{uid}", f"twin-{uid}"]}
    private = owner.create_published(f"secret-{uid}", permissions=grants)["script_id"]
    owner.create(f"draft-{uid}")
    # the same user id, team and org names in another tenant: none of it crosses
    twin = Caller(api, f"quant-{uid}", f"rival-{uid}", teams=(f"quants-{uid}",), orgs=(f"desk-{uid}",))
    other = Caller(api, f"twin-{uid}", f"rival-{uid}", teams=(f"quants-{uid}",))
    mine = twin.create_published(f"own-{uid}")["script_id"]
    for caller in (twin, other):
        for query in [*FILTERS, {"owner": owner.user_id}, {"q": f"secret-{uid}"}, {"q": uid},
                      {"cursor": private[:-1]}, {"cursor": "a"}]:
            rows = listing(caller, **query)
            assert not any(r["tenant"] == owner.tenant for r in rows), (caller.tenant, query, rows)
            assert private not in ids_of(rows)
    assert ids_of(listing(twin)) == [mine]
    # the owner sees both, the draft as a draft
    seen = {r["script_id"]: r for r in listing(owner)}
    assert seen[private]["access"] == "owner" and seen[owner.sid(f"draft-{uid}")]["status"] == "draft"


def test_inside_a_tenant_only_what_is_shared_with_the_caller(api, uid):
    owner = Caller(api, f"owner-{uid}", f"acme-{uid}")
    team = Caller(api, f"member-{uid}", f"acme-{uid}", teams=(f"quants-{uid}",))
    named = Caller(api, f"named-{uid}", f"acme-{uid}")
    outsider = Caller(api, f"outsider-{uid}", f"acme-{uid}", teams=(f"sales-{uid}",))
    shared = owner.create_published(f"shared-{uid}", permissions={"teams": [f"quants-{uid}"]})["script_id"]
    by_name = owner.create_published(f"named-{uid}", permissions={"allowed_users": [named.user_id]})["script_id"]
    gated = owner.create_published(f"gated-{uid}", permissions={"teams": [f"quants-{uid}"],
                                                                "tiers": ["enterprise"]})["script_id"]
    owner.create(f"draft-{uid}", permissions={"teams": [f"quants-{uid}"]})
    assert [(r["script_id"], r["access"]) for r in listing(team)] == [(shared, "shared")]
    assert ids_of(listing(named)) == [by_name]
    assert listing(outsider) == []
    assert gated not in ids_of(listing(team))  # tier-restricted: not usable, not listed
    # rule 7: a newer version without the team revokes every version, and the listing follows
    assert owner.call("PATCH", f"/scripts/{shared}", {"permissions": {}}).status_code == 200
    assert owner.publish(shared).status_code == 201
    assert listing(team) == []


def test_marketplace_scripts_appear_once_entitled_and_go_when_unlisted(api, uid):
    seller = Caller(api, f"seller-{uid}", f"vendor-{uid}", features=LISTS)
    listed = seller.create_published(f"listed-{uid}", permissions={"marketplace": True})["script_id"]
    buyer = Caller(api, f"buyer-{uid}", f"client-{uid}")
    for query in FILTERS:
        assert listed not in ids_of(listing(buyer, **query)), query
    assert buyer.call("POST", f"/scripts/{listed}/marketplace/subscribe").status_code == 201
    rows = listing(buyer)
    assert [(r["script_id"], r["access"]) for r in rows] == [(listed, "marketplace")]
    assert ids_of(listing(buyer, marketplace=True)) == [listed] and listing(buyer, marketplace=False) == []
    # another user of the buyer's tenant did not subscribe: not entitled, not listed
    assert listing(Caller(api, f"colleague-{uid}", buyer.tenant)) == []
    seller.call("PATCH", f"/scripts/{listed}", {"permissions": {"marketplace": False}})
    assert seller.publish(listed).status_code == 201
    assert listing(buyer) == []


def test_pages_cover_everything_once_in_order(api, uid):
    me = Caller(api, f"many-{uid}", f"acme-{uid}")
    made = sorted(me.create_published(f"s{i}-{uid}")["script_id"] for i in range(7))
    me.create(f"zz-draft-{uid}")
    pages, cursor = [], None
    for _ in range(10):
        page = me.client.list_scripts(limit=3, cursor=cursor, status="published")
        pages.append(ids_of(page["scripts"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [sid for page in pages for sid in page] == made
    assert all(len(p) <= 3 for p in pages) and cursor is None


@pytest.mark.parametrize("query, status, code", [
    ("limit=0", 422, "invalid_parameter"), ("limit=201", 422, "invalid_parameter"),
    ("limit=x", 422, "invalid_parameter"), ("status=gone", 422, "invalid_parameter"),
    ("runtime_mode=batch", 422, "invalid_parameter"), ("mine=maybe", 422, "invalid_parameter"),
    ("cursor=../x", 422, "invalid_script_id"), ("cursor=%00", 422, "invalid_script_id"),
    ("owner=a%2Fb", 422, "invalid_owner_id"), ("q=" + "x" * 101, 422, "invalid_parameter"),
    ("q=%0A", 422, "invalid_parameter"), ("tenant=other", 400, "unknown_parameter"),
])
def test_bad_listing_queries_are_refused(api, uid, query, status, code):
    me = Caller(api, f"u-{uid}", f"acme-{uid}")
    resp = me.call("GET", f"/scripts?{query}")
    assert resp.status_code == status, resp.text
    assert error_code(resp) == code


def test_listing_needs_a_token_and_the_feature(api, uid):
    assert Caller(api, "x", "y").call("GET", "/scripts", token="").status_code == 401
    free = Caller(api, f"free-{uid}", f"acme-{uid}", tier="free")
    resp = free.call("GET", "/scripts")
    assert resp.status_code == 403 and error_code(resp) == "tier_not_allowed"


@pytest.fixture
def tenant(stack, uid):
    """A tenant of its own whose subscriptions are dropped afterwards (they pin function slots and
    would be evaluated on other tests' events)."""
    name = f"acme-{uid}"
    yield name
    drop_subscriptions(stack, name)


def test_deprecated_versions_take_no_new_subscriptions_and_running_ones_go_on(api, stack, uid, tenant):
    owner = Caller(api, f"owner-{uid}", tenant)
    member = Caller(api, f"member-{uid}", tenant, teams=(f"quants-{uid}",))
    sid = owner.create_published(f"dep-{uid}", permissions={"teams": [f"quants-{uid}"]})["script_id"]
    running = member.call("POST", f"/scripts/{sid}/subscribe", GOOG | {"backfill": 0})  # published by AT below
    assert running.status_code == 201, running.text
    # only the owner deprecates; other tenants do not even learn the script exists
    resp = member.call("POST", f"/scripts/{sid}/versions/1/deprecate", {})
    assert resp.status_code == 403 and error_code(resp) == "not_owner"
    resp = Caller(api, f"owner-{uid}", f"other-{uid}").call("POST", f"/scripts/{sid}/versions/1/deprecate")
    assert resp.status_code == 404 and error_code(resp) == "script_not_found"
    for bad, code in (("7", "version_not_found"), ("0", "invalid_version"), ("x", "invalid_version")):
        resp = owner.call("POST", f"/scripts/{sid}/versions/{bad}/deprecate")
        assert error_code(resp) == code, resp.text
    assert owner.call("POST", f"/scripts/{sid}/versions/1/deprecate", {"reason": "x" * 501}).status_code == 422
    assert owner.call("POST", f"/scripts/{sid}/versions/1/deprecate", {"why": "no"}).status_code == 422
    ok = owner.call("POST", f"/scripts/{sid}/versions/1/deprecate", {"reason": "use v2"})
    assert ok.status_code == 200 and ok.json()["deprecated"] is True
    # no new subscription to it: explicit version, the latest by default, another user, the owner
    for who, body in ((member, GOOG | {"timeframe": "1h", "instrument_key": "EURUSD"}),
                      (owner, GOOG | {"version": 1}), (owner, GOOG)):
        resp = who.call("POST", f"/scripts/{sid}/subscribe", body)
        assert resp.status_code == 409 and error_code(resp) == "version_deprecated", resp.text
    # the running subscription goes on: still listed, still evaluated and published
    subs = member.call("GET", "/subscriptions").json()["subscriptions"]
    assert [s["id"] for s in subs] == [running.json()["id"]]
    evaluator = app().evaluator(stack)
    try:
        evaluator.process([Event("GOOG", "1d", AT)])
    finally:
        evaluator.close()
    signal = member.call("GET", f"/signals/GOOG/custom/{sid}?timeframe=1d")
    assert signal.status_code == 200 and signal.json()["timestamp"] == AT, signal.text
    # executes go on too; the listing and the versions show it
    assert member.call("POST", f"/scripts/{sid}/execute", GOOG | {"timestamp": AT}).json()["status"] == "ok"
    row = listing(member)[0]
    assert row["status"] == "deprecated" and row["deprecated_versions"] == [1]
    assert member.call("GET", f"/scripts/{sid}/versions").json()["versions"][0]["deprecation_reason"] == "use v2"
    # a newer version takes subscriptions; v1 stays deprecated
    owner.call("PATCH", f"/scripts/{sid}", {"description": "v2"})
    assert owner.publish(sid).status_code == 201
    assert owner.call("POST", f"/scripts/{sid}/subscribe", GOOG).status_code == 201
    assert owner.call("POST", f"/scripts/{sid}/subscribe", GOOG | {"version": 1}).status_code == 409
    row = listing(owner)[0]
    assert row["status"] == "published" and row["deprecated_versions"] == [1]
    # withdrawing the deprecation reopens it
    assert owner.call("DELETE", f"/scripts/{sid}/versions/1/deprecation").json()["deprecated"] is False
    assert owner.call("POST", f"/scripts/{sid}/subscribe", {**GOOG, "version": 1, "params": {"n": 1}}).status_code \
        == 201


def test_cursor_never_opens_other_tenants(api):
    """Cursors are only a position in the caller's own candidates: a cursor naming another tenant's id,
    or sorting just before it, lists nothing of that tenant."""
    u = uuid.uuid4().hex[:8]
    victim = Caller(api, f"v-{u}", f"victim-{u}")
    hidden = victim.create_published(f"aaa-{u}")["script_id"]
    attacker = Caller(api, f"a-{u}", f"attacker-{u}")
    for cursor in (hidden, hidden[:-1], "a", "0"):
        page = attacker.client.list_scripts(cursor=cursor, limit=200)
        assert hidden not in ids_of(page["scripts"])
