"""Hostile ids on every route and body field never reach an S3 key or a catalog row."""

from __future__ import annotations

import urllib.parse

import psycopg
import pytest

from customscripts.auth import issue_user_token
from customscripts.http import LocalServer
from customscripts.registry.api import handle
from customscripts.registry.store import ScriptStore
from tests.integration.registry_support import LISTS, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]


def hostile(marker: str) -> list[str]:
    """Every string contains `marker`, so any leak is found by searching for it."""
    return [
        f"../{marker}",
        f"{marker}/../../etc",
        f"{marker}/x",
        f"..{marker}",
        f"{marker}\x00",
        f"{marker}\x07bell",
        f"{marker}\n",
        f"{marker}\u202e",
        f"{marker}\uff0fx",  # fullwidth solidus
        f"\u0455{marker}",  # Cyrillic dze, looks like 's'
        f"{marker}\u0430",  # Cyrillic a
        f"{marker}'; DROP TABLE scripts; --",
        f"{marker}%2F..%2F",
        f"{marker}" + "a" * 10_000,
        f" {marker}",
    ]


@pytest.fixture(scope="module")
def base(stack) -> str:
    server = LocalServer(handle).start()
    yield server.url
    server.stop()


def _path(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def test_hostile_ids_never_reach_keys_or_rows(stack, base, uid):
    marker = f"h{uid}"
    owner = Caller(base, f"owner-{uid}", f"tenant-{uid}", features=LISTS)
    legit = f"legit-{uid}"
    owner.create_published(legit, permissions={"marketplace": True})
    statuses: set[int] = set()

    def expect_rejected(resp) -> None:
        statuses.add(resp.status_code)
        assert resp.status_code in (400, 401, 404, 405, 413, 422), (resp.status_code, resp.text[:200])
        error_code(resp)

    for bad in hostile(marker):
        p = _path(bad)
        # Path ids, on every route that takes one.
        for method, path in [("GET", f"/scripts/{p}"), ("PUT", f"/scripts/{p}"), ("PATCH", f"/scripts/{p}"),
                             ("POST", f"/scripts/{p}/publish"), ("GET", f"/scripts/{p}/versions"),
                             ("GET", f"/scripts/{p}/versions/1"), ("GET", f"/scripts/{legit}/versions/{p}"),
                             ("POST", f"/scripts/{p}/marketplace/subscribe")]:
            expect_rejected(owner.call(method, path, {"name": "x"} if method in ("PUT", "PATCH") else None))
        # Body ids: the script id, dependencies, and every id list in permissions.
        bodies = [
            {"script_id": bad},
            {"depends_on": [f"{bad}@1"]},
            {"depends_on": [f"{legit}@{bad}"]},
            {"permissions": {"allowed_users": [bad]}},
            {"permissions": {"teams": [bad]}},
            {"permissions": {"orgs": [bad]}},
            {"permissions": {"tiers": [bad]}},
            {"permissions": {"features": [bad]}},
        ]
        for extra in bodies:
            expect_rejected(owner.call("POST", "/scripts",
                                       {"name": "n", "source": "def run(ctx):\n    return 1\n", **extra}))
            if "script_id" not in extra:
                expect_rejected(owner.call("PATCH", f"/scripts/{legit}", extra))
        # Token claims: a hostile subject, tenant or team is an authentication failure.
        for claims in ({"user_id": bad, "tenant": owner.tenant}, {"user_id": owner.user_id, "tenant": bad}):
            token = issue_user_token(claims["user_id"], claims["tenant"])
            expect_rejected(owner.call("POST", "/scripts", {"name": "n", "source": "x"}, token=token))
        token = issue_user_token(owner.user_id, owner.tenant, teams=[bad])
        expect_rejected(owner.call("GET", f"/scripts/{legit}", token=token))

    assert 422 in statuses and 401 in statuses

    keys = ScriptStore(stack).keys("")
    assert keys and not [k for k in keys if marker.lower() in k.lower()]
    assert not [k for k in keys if not k.isascii() or ".." in k or any(ord(c) < 32 for c in k)]
    with psycopg.connect(stack.pg_dsn) as conn:
        for table in ("scripts", "script_versions", "marketplace_subscriptions", "audit"):
            hits = conn.execute(f"SELECT count(*) FROM {table} t WHERE strpos(lower(t::text), %s) > 0",
                                (marker.lower(),)).fetchone()[0]
            assert hits == 0, table
    # The legitimate script is intact.
    assert owner.call("GET", f"/scripts/{legit}").json()["depends_on"] == []
