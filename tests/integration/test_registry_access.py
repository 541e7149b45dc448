"""The access matrix (DESIGN 3.2) over the API and over the check execute uses, on the real stack."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from customscripts.app import app
from customscripts.auth import decode_token
from customscripts.errors import Forbidden, NotFound
from customscripts.http import LocalServer
from customscripts.registry.api import handle
from tests.integration.registry_support import LISTS, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]


@dataclass
class World:
    base: str
    u: str
    owner: Caller
    listed: str  # marketplace-listed, also shared with team / org / allowed user
    private: str  # same grants, not listed
    chain: str  # allows the allowed user, depends on `gated` which does not


@pytest.fixture(scope="module")
def world(stack) -> World:
    server = LocalServer(handle).start()
    u = uuid.uuid4().hex[:8]
    owner = Caller(server.url, f"owner-{u}", f"acme-{u}", features=LISTS)
    grants = {"teams": [f"quants-{u}"], "orgs": [f"desk-{u}"], "allowed_users": [f"allowed-{u}"]}
    listed, private, gated, chain = (owner.sid(f"{n}-{u}") for n in ("listed", "private", "gated", "chain"))
    owner.create_published(listed, permissions={**grants, "marketplace": True})
    owner.create_published(private, permissions=grants)
    owner.create_published(gated, permissions={"teams": [f"quants-{u}"]})
    owner.create_published(chain, permissions={"allowed_users": [f"allowed-{u}"], "teams": [f"quants-{u}"]},
                           depends_on=[f"{gated}@1"])
    subscriber = persona(World(server.url, u, owner, listed, private, chain), "subscriber")
    assert subscriber.call("POST", f"/scripts/{listed}/marketplace/subscribe").status_code == 201
    yield World(server.url, u, owner, listed, private, chain)
    server.stop()


def persona(w: World, name: str) -> Caller:
    u, acme, other = w.u, w.owner.tenant, f"globex-{w.u}"
    return {
        "owner": w.owner,
        "team_member": Caller(w.base, f"tm-{u}", acme, teams=(f"quants-{u}",)),
        "org_member": Caller(w.base, f"om-{u}", acme, orgs=(f"desk-{u}",)),
        "allowed_user": Caller(w.base, f"allowed-{u}", acme),
        "subscriber": Caller(w.base, f"sub-{u}", other),
        "other_tenant": Caller(w.base, f"stranger-{u}", other),
        # Same team and user ids as entitled people, but in another tenant: grants never cross.
        "other_tenant_lookalike": Caller(w.base, f"allowed-{u}", other, teams=(f"quants-{u}",)),
        "same_tenant_unrelated": Caller(w.base, f"colleague-{u}", acme),
        "free_tier_team_member": Caller(w.base, f"cheap-{u}", acme, tier="free", teams=(f"quants-{u}",)),
        "tier_without_feature_subscriber": Caller(w.base, f"sub-{u}", other, tier="free"),
    }[name]


# persona: (status on the listed script, status on the private script, sees source)
MATRIX = {
    "owner": (200, 200, True),
    "team_member": (200, 200, False),
    "org_member": (200, 200, False),
    "allowed_user": (200, 200, False),
    "subscriber": (200, 404, False),
    "other_tenant": (403, 404, False),
    "other_tenant_lookalike": (403, 404, False),
    "same_tenant_unrelated": (403, 403, False),
    "free_tier_team_member": (403, 403, False),
    "tier_without_feature_subscriber": (403, 403, False),
}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_get_script_matrix(world, name):
    who = persona(world, name)
    listed_status, private_status, sees_source = MATRIX[name]
    for sid, expected in ((world.listed, listed_status), (world.private, private_status)):
        resp = who.call("GET", f"/scripts/{sid}")
        assert resp.status_code == expected, (name, sid, resp.text)
        if expected == 200:
            body = resp.json()
            assert bool(body.get("source")) == sees_source
            assert body["script_id"] == sid
        else:
            error_code(resp)
        version = who.call("GET", f"/scripts/{sid}/versions/1")
        assert version.status_code == expected
        assert ("source" in version.json()) == (expected == 200 and sees_source)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_execution_check_matrix(world, name):
    """The check execute runs before anything starts: same answers as the API."""
    principal = decode_token(persona(world, name).token)
    for sid, expected in ((world.listed, MATRIX[name][0]), (world.private, MATRIX[name][1])):
        if expected == 200:
            assert app().registry.check_execution(principal, sid, 1) == [(sid, 1)]
        else:
            with pytest.raises(NotFound if expected == 404 else Forbidden):
                app().registry.check_execution(principal, sid, 1)


def test_every_dependency_must_be_usable(world):
    """The allowed user may use `chain` but not its dependency `gated`: 403 naming the dependency."""
    allowed = decode_token(persona(world, "allowed_user").token)
    assert allowed.user_id == f"allowed-{world.u}"
    with pytest.raises(Forbidden) as err:
        app().registry.check_execution(allowed, world.chain, 1)
    gated = world.owner.sid(f"gated-{world.u}")
    assert err.value.code == "dependency_forbidden" and f"{gated}@1" in err.value.message
    team = decode_token(persona(world, "team_member").token)
    assert app().registry.check_execution(team, world.chain, 1) == [(gated, 1), (world.chain, 1)]


def test_subscriber_lists_only_listed_versions_and_never_sees_source(world):
    sub = persona(world, "subscriber")
    versions = sub.call("GET", f"/scripts/{world.listed}/versions").json()["versions"]
    assert [v["version"] for v in versions] == [1]
    assert "source" not in sub.call("GET", f"/scripts/{world.listed}").json()
    assert sub.call("GET", f"/scripts/{world.listed}/versions/draft").status_code == 404


def test_non_owners_cannot_edit_or_publish(world):
    for name in ("team_member", "subscriber", "allowed_user"):
        who = persona(world, name)
        assert who.call("PATCH", f"/scripts/{world.listed}", {"name": "pwned"}).status_code in (403, 404)
        assert who.call("POST", f"/scripts/{world.listed}/publish").status_code in (403, 404)
    assert world.owner.call("GET", f"/scripts/{world.listed}").json()["name"] != "pwned"
