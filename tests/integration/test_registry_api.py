"""registry-fn over real HTTP against the real stack: layout, immutability, validation, statuses."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest

from customscripts.app import app
from customscripts.auth import Principal, issue_user_token
from customscripts.config import Tier
from customscripts.errors import Conflict, Forbidden
from customscripts.http import LocalServer
from customscripts.registry.api import handle
from customscripts.registry.models import DraftCreate
from customscripts.registry.namespace import qualify
from customscripts.registry.service import RegistryService
from customscripts.registry.store import ScriptStore
from tests.integration.registry_support import LISTS, RUN_OK, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]


@pytest.fixture(scope="module")
def base(stack) -> str:
    server = LocalServer(handle).start()
    yield server.url
    server.stop()


@pytest.fixture
def alice(base, uid) -> Caller:
    return Caller(base, f"alice-{uid}", f"acme-{uid}", features=LISTS)


@pytest.fixture
def store(stack) -> ScriptStore:
    return ScriptStore(stack)


# ----------------------------------------------------------------- layout and immutability


def test_bucket_keys_follow_the_exact_layout(alice, store, uid):
    sid = alice.sid(f"layout-{uid}")
    alice.create_published(sid)
    assert alice.call("PATCH", f"/scripts/{sid}", {"source": "def run(ctx):\n    return 2.0\n"}).status_code == 200
    assert alice.publish(sid).status_code == 201
    keys = store.keys(f"scripts/{alice.user_id}/")
    owner, tenant = alice.user_id, alice.tenant
    assert keys == sorted(f"scripts/{owner}/{sid}/{v}/{f}" for v in ("draft", "1", "2")
                          for f in ("script.py", "meta.json"))
    meta = store.get_meta(owner, sid, 2)
    assert (meta.script_id, meta.version, meta.owner_id, meta.tenant, meta.status) == (sid, 2, owner, tenant,
                                                                                       "published")
    assert store.get_source(owner, sid, 2) == "def run(ctx):\n    return 2.0\n"


def test_published_bytes_never_change(alice, store, uid):
    sid = alice.sid(f"immut-{uid}")
    v1 = alice.create_published(sid)
    assert v1["version"] == 1 and v1["unchanged"] is False
    k_code = f"scripts/{alice.user_id}/{sid}/1/script.py"
    k_meta = f"scripts/{alice.user_id}/{sid}/1/meta.json"
    before = {k: (store.read_bytes(k), store.stat(k).etag) for k in (k_code, k_meta)}
    edit = alice.call("PUT", f"/scripts/{sid}", {"source": "def run(ctx):\n    return 3.0\n", "name": "v2"})
    assert edit.status_code == 200, edit.text
    v2 = alice.publish(sid)
    assert v2.status_code == 201 and v2.json()["version"] == 2
    after = {k: (store.read_bytes(k), store.stat(k).etag) for k in (k_code, k_meta)}
    assert after == before
    assert alice.call("GET", f"/scripts/{sid}/versions/1").json()["source"] == RUN_OK


def test_store_refuses_to_overwrite_a_published_version(alice, store, uid):
    sid = alice.sid(f"overwrite-{uid}")
    alice.create_published(sid)
    meta = store.get_meta(alice.user_id, sid, 1)
    etag = store.stat(f"scripts/{alice.user_id}/{sid}/1/script.py").etag
    with pytest.raises(Conflict):
        store.put_version(meta, "def run(ctx):\n    return 666\n")
    assert store.stat(f"scripts/{alice.user_id}/{sid}/1/script.py").etag == etag


def test_publishing_an_unchanged_draft_returns_the_existing_version(alice, uid):
    sid = f"same-{uid}"
    first = alice.create_published(sid)
    again = alice.publish(sid)
    assert again.status_code == 200
    assert again.json()["unchanged"] is True and again.json()["version"] == 1
    assert again.json()["code_sha256"] == first["code_sha256"]
    assert [v["version"] for v in alice.call("GET", f"/scripts/{sid}/versions").json()["versions"]] == [1]
    # A metadata-only change is a change.
    alice.call("PATCH", f"/scripts/{sid}", {"description": "now documented"})
    assert alice.publish(sid).status_code == 201


def test_same_code_same_sha256(alice, uid):
    a = alice.create(f"sha-a-{uid}").json()
    b = alice.create(f"sha-b-{uid}").json()
    assert a["code_sha256"] == b["code_sha256"]


def test_catalog_mirrors_versions(stack, alice, uid):
    sid = alice.sid(f"catalog-{uid}")
    alice.create_published(sid, permissions={"marketplace": True})
    with psycopg.connect(stack.pg_dsn) as conn:
        row = conn.execute("SELECT owner_id, tenant, latest_version, marketplace FROM scripts WHERE script_id = %s",
                           (sid,)).fetchone()
        versions = conn.execute("SELECT version, status FROM script_versions WHERE script_id = %s",
                                (sid,)).fetchall()
    assert row == (alice.user_id, alice.tenant, 1, True)
    assert versions == [(1, "published")]


# ----------------------------------------------------------------- dependencies


def test_dependencies_resolve_in_order(alice, uid):
    a, b, c = (alice.sid(f"dep-{n}-{uid}") for n in "abc")
    alice.create_published(a)
    alice.create_published(b, depends_on=[f"{a}@1"])
    alice.create_published(c, depends_on=[f"{b}@1", f"{a}@1"])
    assert app().registry.resolve_closure(c, 1) == [(a, 1), (b, 1), (c, 1)]
    assert alice.call("GET", f"/scripts/{c}/versions/1").json()["depends_on"] == [f"{b}@1", f"{a}@1"]


def test_self_cycle_is_rejected(alice, uid):
    sid = alice.sid(f"selfcyc-{uid}")
    alice.create_published(sid)
    resp = alice.call("PATCH", f"/scripts/{sid}", {"depends_on": [f"{sid}@1"]})
    assert resp.status_code == 422 and error_code(resp) == "dependency_cycle"
    assert resp.json()["error"]["details"]["cycle"] == [sid]


def test_three_cycle_is_rejected_naming_members(alice, uid):
    a, b, c = (alice.sid(f"cyc-{n}-{uid}") for n in "abc")
    alice.create_published(a)
    alice.create_published(b, depends_on=[f"{a}@1"])
    alice.create_published(c, depends_on=[f"{b}@1"])
    resp = alice.call("PATCH", f"/scripts/{a}", {"depends_on": [f"{c}@1"]})
    assert resp.status_code == 422 and error_code(resp) == "dependency_cycle"
    assert resp.json()["error"]["details"]["cycle"] == [a, c, b]
    for member in (a, b, c):
        assert member in resp.json()["error"]["message"]
    # The draft was not changed, so publishing cannot smuggle the cycle in either.
    assert alice.call("GET", f"/scripts/{a}").json()["depends_on"] == []


def test_dependency_of_another_tenant_is_rejected(base, alice, uid):
    mallory = Caller(base, f"mallory-{uid}", f"other-{uid}", features=LISTS)
    private, listed = mallory.sid(f"foreign-{uid}"), mallory.sid(f"foreign-mk-{uid}")
    mallory.create_published(private)
    mallory.create_published(listed, permissions={"marketplace": True})
    assert alice.call("POST", f"/scripts/{listed}/marketplace/subscribe").status_code == 201
    for n, dep in enumerate((private, listed)):
        resp = alice.create(f"uses-{n}-{uid}", depends_on=[f"{dep}@1"])
        assert resp.status_code == 422 and error_code(resp) == "invalid_dependency", resp.text
    # Another tenant's private script reads exactly like a missing one.
    missing = alice.create(f"uses-missing-{uid}", depends_on=[f"nosuch-{uid}@1"])
    assert missing.json()["error"]["message"].replace(f"nosuch-{uid}", "X") == \
        alice.create(f"uses-p-{uid}", depends_on=[f"{private}@1"]).json()["error"]["message"].replace(private, "X")


def test_dependency_must_be_published_and_accessible(base, alice, uid):
    bob = Caller(base, f"bob-{uid}", alice.tenant)
    draft_only = f"draftonly-{uid}"
    assert bob.create(draft_only).status_code == 201
    bobs = f"bobs-{uid}"
    bob.create_published(bobs)
    for dep in (f"{draft_only}@1", f"{bobs}@1", f"{bobs}@2"):
        resp = alice.create(f"x-{uid}", depends_on=[dep])
        assert resp.status_code == 422 and error_code(resp) == "invalid_dependency", dep
    shared = f"bobshared-{uid}"
    bob.create_published(shared, permissions={"allowed_users": [alice.user_id]})
    assert alice.create(f"ok-{uid}", depends_on=[f"{shared}@1"]).status_code == 201


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize("source, code", [
    ("def run(ctx):\n    return (1\n", "syntax_error"),
    ("x = 1\n", "missing_run"),
    ("def run():\n    return 1\n", "invalid_run"),
    ("async def run(ctx):\n    return 1\n", "invalid_run"),
    ("class C:\n    def run(self, ctx):\n        return 1\n", "missing_run"),
    ("def run(ctx):\n    return 1\nreturn 2\n", "syntax_error"),
    ("def run(ctx):\n    return 1\x00\n", "syntax_error"),
])
def test_bad_source_is_422(alice, uid, source, code):
    resp = alice.create(f"bad-{uid}", source=source)
    assert resp.status_code == 422 and error_code(resp) == code, resp.text


def test_syntax_error_reports_line_and_column(alice, uid):
    resp = alice.create(f"syn-{uid}", source="import math\n\ndef run(ctx):\n    return math.sqrt(4))\n")
    details = resp.json()["error"]["details"]
    assert resp.status_code == 422 and details["line"] == 4 and details["column"] == 24


def test_invalid_json_schemas_are_422(alice, uid):
    for field, schema in [("input_schema", {"type": "nonsense"}), ("output_schema", {"pattern": "("}),
                          ("output_schema", {"properties": 3}), ("input_schema", "object")]:
        resp = alice.create(f"schema-{uid}", **{field: schema})
        assert resp.status_code == 422, (field, schema, resp.text)
        assert error_code(resp) in ("invalid_schema", "invalid_body")


def test_oversized_source_is_413(alice, uid):
    resp = alice.create(f"big-{uid}", source=RUN_OK + "#" * (256 * 1024))
    assert resp.status_code == 413 and error_code(resp) == "source_too_large"


def test_limits_over_the_tier_cap_are_422(alice, uid):
    resp = alice.create(f"lim-{uid}", limits={"timeout_ms": 10_000_000})
    assert resp.status_code == 422
    resp = alice.create(f"lim-{uid}", limits={"timeout_ms": 999_999})
    assert resp.status_code == 422 and error_code(resp) == "limits_exceed_tier"
    assert alice.create(f"lim-{uid}", limits={"timeout_ms": 500}).status_code == 201


def test_tier_script_cap(stack, uid):
    tiny = dataclasses.replace(stack.tiers["pro"], name="tiny", max_scripts=2)
    cfg = dataclasses.replace(stack, tiers={**stack.tiers, "tiny": tiny})
    svc = RegistryService(cfg)
    who = Principal(user_id=f"capped-{uid}", tenant=f"capt-{uid}", tier="tiny")
    for n in range(2):
        svc.create_draft(who, DraftCreate(name="n", script_id=f"cap{n}-{uid}", source=RUN_OK))
    with pytest.raises(Forbidden) as err:
        svc.create_draft(who, DraftCreate(name="n", script_id=f"cap2-{uid}", source=RUN_OK))
    assert err.value.code == "script_quota_exceeded"
    assert svc.catalog.get_script(qualify(f"cap2-{uid}", who.tenant)) is None
    assert isinstance(tiny, Tier)


# ----------------------------------------------------------------- statuses on every route

ROUTES = [
    ("POST", "/scripts/{sid}/publish"),
    ("GET", "/scripts/{sid}"),
    ("PUT", "/scripts/{sid}"),
    ("PATCH", "/scripts/{sid}"),
    ("GET", "/scripts/{sid}/versions"),
    ("GET", "/scripts/{sid}/versions/1"),
    ("POST", "/scripts/{sid}/marketplace/subscribe"),
    ("POST", "/scripts/{sid}/series"),
    ("POST", "/scripts"),
]


def _body_for(method: str, path: str, sid: str) -> dict | None:
    if path == "/scripts":
        return {"name": "n", "script_id": sid, "source": RUN_OK}
    return {"description": "d"} if method in ("PUT", "PATCH") else None


@pytest.mark.parametrize("method, template", ROUTES)
def test_401_without_or_with_bad_token(alice, uid, method, template):
    sid = f"auth-{uid}"
    path = template.format(sid=sid)
    expired = issue_user_token(alice.user_id, alice.tenant, ttl_s=-10)
    forged = issue_user_token(alice.user_id, alice.tenant)[:-4] + "AAAA"
    for token in ("", "garbage", expired, forged):
        resp = alice.call(method, path, _body_for(method, template, sid), token=token)
        assert resp.status_code == 401 and error_code(resp) == "unauthorized", (token[:10], resp.text)
    resp = alice.call(method, path, _body_for(method, template, sid), token=None)
    assert resp.status_code != 401


@pytest.mark.parametrize("method, template", ROUTES)
def test_403_for_a_tier_without_the_feature_writes_nothing(base, alice, store, uid, method, template):
    sid = f"tier-{uid}"
    alice.create_published(sid, permissions={"marketplace": True})
    free = Caller(base, f"free-{uid}", alice.tenant, tier="free")
    new_sid = f"tier-new-{uid}"
    target = new_sid if template == "/scripts" else sid
    resp = free.call(method, template.format(sid=target), _body_for(method, template, target))
    assert resp.status_code == 403 and error_code(resp) == "tier_not_allowed"
    assert store.keys(f"scripts/{free.user_id}/") == []
    assert app().registry.catalog.get_script(alice.sid(new_sid)) is None


@pytest.mark.parametrize("method, template", ROUTES[:-1])
def test_404_for_unknown_scripts(alice, uid, method, template):
    resp = alice.call(method, template.format(sid=f"nosuch-{uid}"), _body_for(method, template, ""))
    assert resp.status_code == 404 and error_code(resp) == "script_not_found"


@pytest.mark.parametrize("method, template", ROUTES[:-1])
def test_404_for_another_tenants_private_script(base, alice, uid, method, template):
    sid = f"private-{uid}"
    alice.create_published(sid)
    eve = Caller(base, alice.user_id, f"evil-{uid}")  # same user id, other tenant
    resp = eve.call(method, template.format(sid=sid), _body_for(method, template, sid))
    assert resp.status_code == 404 and error_code(resp) == "script_not_found"


@pytest.mark.parametrize("method, template", ROUTES[:-1])
def test_403_for_a_same_tenant_user_without_entitlement(base, alice, uid, method, template):
    sid = f"noent-{uid}"
    alice.create_published(sid)
    bob = Caller(base, f"bob-{uid}", alice.tenant)
    resp = bob.call(method, template.format(sid=sid), _body_for(method, template, sid))
    assert resp.status_code == 403, resp.text
    assert error_code(resp) in ("not_owner", "not_entitled", "not_listed")


@pytest.mark.parametrize("method, template", ROUTES)
def test_422_for_invalid_ids(alice, method, template):
    path = template.format(sid="Bad..ID")
    body = _body_for(method, template, "Bad..ID")
    resp = alice.call(method, path, body)
    assert resp.status_code == 422 and error_code(resp) in ("invalid_script_id", "invalid_body"), resp.text


def test_409_on_an_id_taken_in_the_same_tenant_only(base, alice, uid):
    """Chosen ids are per tenant: taken in the caller's own tenant is a 409; another tenant's use of
    the same id is invisible (tests/security/test_registry_attacks.py has the attack)."""
    sid = f"taken-{uid}"
    assert alice.create(sid).status_code == 201
    bob = Caller(base, f"bob-{uid}", alice.tenant)
    resp = bob.create(sid)
    assert resp.status_code == 409 and error_code(resp) == "script_id_taken"
    other = Caller(base, f"zed-{uid}", f"zt-{uid}")
    created = other.create(sid)
    assert created.status_code == 201 and created.json()["script_id"] == other.sid(sid) != alice.sid(sid)


def test_422_on_bad_version_and_404_on_missing_version(alice, uid):
    sid = f"ver-{uid}"
    alice.create_published(sid)
    for bad in ("0", "-1", "1.0", "x", "9999999999"):
        resp = alice.call("GET", f"/scripts/{sid}/versions/{bad}")
        assert resp.status_code == 422 and error_code(resp) == "invalid_version", bad
    resp = alice.call("GET", f"/scripts/{sid}/versions/7")
    assert resp.status_code == 404 and error_code(resp) == "version_not_found"
    assert alice.call("GET", f"/scripts/{sid}/versions/draft").json()["status"] == "draft"


def test_400_and_422_on_bad_bodies(alice, uid):
    resp = alice.call("POST", "/scripts", raw=b"{not json")
    assert resp.status_code == 400 and error_code(resp) == "invalid_json"
    resp = alice.call("POST", "/scripts", {"name": "n", "source": RUN_OK, "surprise": 1})
    assert resp.status_code == 422 and error_code(resp) == "invalid_body"
    resp = alice.call("POST", "/scripts", {"name": "n\x00", "source": RUN_OK})
    assert resp.status_code == 422


def test_subscribe_needs_a_listing(base, alice, uid):
    sid = f"unlisted-{uid}"
    alice.create_published(sid)
    bob = Caller(base, f"bob-{uid}", alice.tenant)
    assert error_code(bob.call("POST", f"/scripts/{sid}/marketplace/subscribe")) == "not_listed"
    listed = alice.sid(f"listed-{uid}")
    alice.create_published(listed, permissions={"marketplace": True})
    carol = Caller(base, f"carol-{uid}", f"ct-{uid}")
    assert carol.call("POST", f"/scripts/{listed}/marketplace/subscribe").status_code == 201
    assert carol.call("POST", f"/scripts/{listed}/marketplace/subscribe").status_code == 200


def test_openapi_lists_exactly_the_routes(base, alice):
    doc = alice.call("GET", "/openapi.json", token="").json()
    assert doc["openapi"].startswith("3.1")
    # a version's function URL is documented with the gateway as its server: not a route of this API
    elsewhere = {path for path, item in doc["paths"].items() if "servers" in item}
    assert elsewhere == {"/function/{function_name}", "/async-function/{function_name}"}
    assert sorted(set(doc["paths"]) - elsewhere) == sorted({"/openapi.json", "/scripts", "/scripts/{script_id}",
                                           "/scripts/{script_id}/publish", "/scripts/{script_id}/versions",
                                           "/scripts/{script_id}/versions/{version}",
                                           "/scripts/{script_id}/marketplace/subscribe",
                                           "/scripts/{script_id}/execute", "/scripts/{script_id}/subscribe",
                                           "/scripts/{script_id}/subscriptions/{subscription_id}",
                                           "/subscriptions", "/signals/{instrument_key}/custom/{script_id}",
                                           "/executions/{call_id}", "/scripts/{script_id}/series",
                                           "/scripts/{script_id}/versions/{version}/deprecate",
                                           "/scripts/{script_id}/versions/{version}/deprecation"})
    assert "unchanged" in doc["paths"]["/scripts/{script_id}/publish"]["post"]["summary"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_concurrent_publishes_make_one_version(alice, uid):
    """The catalog row lock serialises publishers: one new version, the others see it unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    sid = f"race-{uid}"
    assert alice.create(sid).status_code == 201
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: alice.publish(sid), range(4)))
    assert sorted(r.status_code for r in results) == [200, 200, 200, 201]
    assert {r.json()["version"] for r in results} == {1}


def test_undeclared_methods_are_405_with_allow(alice, uid):
    for method, path, allow in [("OPTIONS", "/scripts", "GET, POST"),
                                ("DELETE", f"/scripts/x-{uid}", "GET, PATCH, PUT"), ("TRACE", "/scripts", None)]:
        resp = alice.call(method, path)
        assert resp.status_code == 405 and error_code(resp) == "method_not_allowed"
        assert resp.headers.get("Allow")  # TRACE is refused by Flask itself, still with Allow + JSON
        if allow is not None:
            assert resp.headers["Allow"] == allow


def test_storage_outage_is_503_with_json(monkeypatch, stack, alice, uid):
    """S3 unreachable (a real closed port, no mocks): a retryable 503, never a 500."""
    import urllib3
    from minio import Minio

    sid = f"outage-{uid}"
    alice.create_published(sid)
    dead = Minio("127.0.0.1:1", access_key="x", secret_key="y", secure=False,
                 http_client=urllib3.PoolManager(retries=0, timeout=1))
    monkeypatch.setattr(app(), "registry", RegistryService(stack, store=ScriptStore(stack, minio=dead)))
    resp = alice.call("GET", f"/scripts/{sid}")
    assert resp.status_code == 503 and error_code(resp) == "backend_unavailable"
    assert resp.headers["Retry-After"] == "1"
