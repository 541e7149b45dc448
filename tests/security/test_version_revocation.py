"""Issue 10, item 8: revoking access applies to every version of a script, and to its dependents.

Permissions were checked per version: publishing v2 without a user, or unlisted, did not stop v1
for them, nor scripts depending on it. Now a script's current policy (its latest published
version) governs all its versions (customscripts/permissions.py, rule 7). Over the real HTTP path,
and through RegistryService.check_execution, the check the realtime scheduler runs per event.
"""

from __future__ import annotations

import pytest

from customscripts.app import app
from customscripts.auth import decode_token
from customscripts.errors import Forbidden, NotFound
from tests.integration.registry_support import LISTS, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

BODY = {"instrument_key": "GOOG", "timeframe": "1d"}


def run(caller: Caller, script_id: str, version: int | None = None):
    return caller.call("POST", f"/scripts/{script_id}/execute", BODY | ({"version": version} if version else {}))


def usable(caller: Caller, script_id: str, version: int) -> bool:
    """Whether the realtime scheduler's per-event check lets `caller` run it (RegistryService)."""
    try:
        app().registry.check_execution(decode_token(caller.token), script_id, version)
    except (Forbidden, NotFound):
        return False
    return True


def republish(owner: Caller, script_id: str, **changes) -> None:
    assert owner.call("PATCH", f"/scripts/{script_id}", changes).status_code == 200
    assert owner.publish(script_id).status_code == 201


@pytest.mark.parametrize("grant", [
    {"allowed_users": ["USER"]},
    {"teams": ["desk-a"]},
    {"orgs": ["org-a"]},
])
def test_a_new_version_without_the_user_revokes_every_older_version(api, uid, grant):
    owner = Caller(api, f"owner-{uid}", f"fund-{uid}")
    user = Caller(api, f"user-{uid}", owner.tenant, teams=("desk-a",), orgs=("org-a",))
    grant = {k: [user.user_id if v == "USER" else v for v in vs] for k, vs in grant.items()}
    sid = owner.sid(f"shared-{uid}")
    owner.create_published(sid, permissions=grant)
    assert run(user, sid).json()["status"] == "ok"
    assert usable(user, sid, 1)
    republish(owner, sid, permissions={}, description="v2: private again")
    for version in (1, 2, None):
        resp = run(user, sid, version)
        assert resp.status_code == 403 and error_code(resp) == "not_entitled", (version, resp.text)
    for path in (f"/scripts/{sid}/versions/1", f"/scripts/{sid}/versions", f"/scripts/{sid}"):
        assert user.call("GET", path).status_code == 403
    assert not usable(user, sid, 1)
    # The owner still runs every version, and granting again restores every version.
    assert run(owner, sid, 1).json()["status"] == "ok"
    republish(owner, sid, permissions=grant, description="v3")
    assert run(user, sid, 1).json()["status"] == "ok"


def test_revoking_a_dependency_stops_every_dependent_transitively(api, uid):
    owner = Caller(api, f"owner-{uid}", f"fund-{uid}")
    user = Caller(api, f"user-{uid}", owner.tenant)
    allow = {"allowed_users": [user.user_id]}
    base, middle, top = (owner.sid(f"{n}-{uid}") for n in ("base", "middle", "top"))
    owner.create_published(base, permissions=allow)
    owner.create_published(middle, permissions=allow, depends_on=[f"{base}@1"])
    owner.create_published(top, permissions=allow, depends_on=[f"{middle}@1"])
    assert usable(user, top, 1)
    republish(owner, base, permissions={})  # base@2 leaves the user out
    for sid in (middle, top):
        resp = run(user, sid)
        assert resp.status_code == 403 and error_code(resp) == "dependency_forbidden", resp.text
        assert base in resp.json()["error"]["message"]
        assert not usable(user, sid, 1)
    assert run(owner, top).json()["status"] in ("ok", "dependency_failed")  # the owner is never stopped


def test_unlisting_revokes_every_listed_version_for_subscribers(api, uid):
    author = Caller(api, f"author-{uid}", f"vendor-{uid}", features=LISTS)
    buyer = Caller(api, f"buyer-{uid}", f"client-{uid}")
    sid = author.sid(f"product-{uid}")
    author.create_published(sid, permissions={"marketplace": True})
    republish(author, sid, description="v2, still listed")
    assert buyer.call("POST", f"/scripts/{sid}/marketplace/subscribe").status_code == 201
    for version in (1, 2):
        assert run(buyer, sid, version).json()["status"] == "ok"
    republish(author, sid, permissions={"marketplace": False})  # v3: unlisted
    for version in (1, 2, 3, None):
        resp = run(buyer, sid, version)
        assert resp.status_code == 404 and error_code(resp) == "script_not_found", (version, resp.text)
        if version:
            assert not usable(buyer, sid, version)
            assert buyer.call("GET", f"/scripts/{sid}/versions/{version}").status_code == 404


def test_the_latest_version_alone_cannot_grant_older_ones(api, uid):
    """Both must allow: granting a user in v2 does not open v1, whose own permissions left them out."""
    owner = Caller(api, f"owner-{uid}", f"fund-{uid}")
    user = Caller(api, f"user-{uid}", owner.tenant)
    sid = owner.sid(f"grow-{uid}")
    owner.create_published(sid)
    republish(owner, sid, permissions={"allowed_users": [user.user_id]})
    assert run(user, sid, 2).json()["status"] == "ok"
    resp = run(user, sid, 1)
    assert resp.status_code == 403 and error_code(resp) == "not_entitled"
