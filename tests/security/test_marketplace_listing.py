"""Issue 10, item 8: listing on the marketplace needs the `marketplace_publish` feature.

It was defined in the tier table but never enforced. Now every way to set a listing (create, edit,
publish) answers 403 `marketplace_publish_required` without the feature, and writes nothing. An
owner who loses the feature keeps what is already published (the registry learns an owner's
features only from their own token) but can list nothing more: the next version they can publish
is unlisted, and publishing it unlists every version (permissions rule 7).
"""

from __future__ import annotations

import psycopg
import pytest

from customscripts.registry.store import ScriptStore
from tests.integration.registry_support import LISTS, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

LISTED = {"permissions": {"marketplace": True}}
BODY = {"instrument_key": "GOOG", "timeframe": "1d"}


def assert_needs_feature(resp) -> None:
    assert resp.status_code == 403, resp.text
    assert error_code(resp) == "marketplace_publish_required"


def test_listing_without_the_feature_is_refused_everywhere_and_writes_nothing(api, stack, uid):
    pro = Caller(api, f"pro-{uid}", f"shop-{uid}")  # the pro tier has no marketplace_publish
    # create
    assert_needs_feature(pro.create(f"new-{uid}", **LISTED))
    with psycopg.connect(stack.pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM scripts WHERE owner_id = %s AND tenant = %s",
                            (pro.user_id, pro.tenant)).fetchone() == (0,)
    assert ScriptStore(stack).keys(f"scripts/{pro.user_id}/") == []
    # edit (PUT and PATCH), alone and next to other changes
    sid = pro.sid(f"mine-{uid}")
    pro.create_published(sid)
    for method in ("PUT", "PATCH"):
        for body in (LISTED, {**LISTED, "description": "changed too"}):
            assert_needs_feature(pro.call(method, f"/scripts/{sid}", body))
    draft = pro.call("GET", f"/scripts/{sid}").json()
    assert draft["permissions"]["marketplace"] is False and draft["description"] == ""
    # publish: a draft listed while the owner held the feature (another token) cannot be published without it
    holder = Caller(api, pro.user_id, pro.tenant, features=LISTS)
    assert holder.call("PATCH", f"/scripts/{sid}", LISTED).status_code == 200
    assert_needs_feature(pro.publish(sid))
    assert [v["version"] for v in pro.call("GET", f"/scripts/{sid}/versions").json()["versions"]] == [1]
    # nobody else can subscribe to what was never listed
    outsider = Caller(api, f"out-{uid}", f"elsewhere-{uid}")
    assert outsider.call("POST", f"/scripts/{sid}/marketplace/subscribe").status_code == 404


@pytest.mark.parametrize("how", ["tier", "token"])
def test_the_feature_from_the_tier_or_the_token_allows_listing(api, uid, how):
    author = (Caller(api, f"ent-{uid}", f"big-{uid}", tier="enterprise") if how == "tier"
              else Caller(api, f"pro-{uid}", f"big-{uid}", features=LISTS))
    sid = author.sid(f"listed-{uid}")
    author.create_published(sid, **LISTED)
    buyer = Caller(api, f"buyer-{uid}", f"client-{uid}")
    assert buyer.call("POST", f"/scripts/{sid}/marketplace/subscribe").status_code == 201
    assert buyer.call("POST", f"/scripts/{sid}/execute", BODY).json()["status"] == "ok"


def test_an_owner_who_loses_the_feature_can_only_unlist(api, uid):
    with_feature = Caller(api, f"seller-{uid}", f"vendor-{uid}", features=LISTS)
    without = Caller(api, with_feature.user_id, with_feature.tenant)  # the same owner, downgraded
    sid = with_feature.sid(f"product-{uid}")
    with_feature.create_published(sid, **LISTED)
    buyer = Caller(api, f"buyer-{uid}", f"client-{uid}")
    assert buyer.call("POST", f"/scripts/{sid}/marketplace/subscribe").status_code == 201
    # What is published stays listed ...
    assert buyer.call("POST", f"/scripts/{sid}/execute", BODY).json()["status"] == "ok"
    # ... but any change that keeps the listing needs the feature.
    assert_needs_feature(without.call("PATCH", f"/scripts/{sid}", {"description": "v2"}))
    # Unlisting is always allowed, and the unlisted version governs every version.
    assert without.call("PATCH", f"/scripts/{sid}", {"permissions": {"marketplace": False}}).status_code == 200
    assert without.publish(sid).status_code == 201
    resp = buyer.call("POST", f"/scripts/{sid}/execute", BODY | {"version": 1})
    assert resp.status_code == 404, resp.text
