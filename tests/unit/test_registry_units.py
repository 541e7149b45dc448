"""Pure parts of the registry: tokens, the permission rules, meta.json, source/schema checks, cycles."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import jwt
import pytest
from pydantic import ValidationError

from customscripts.auth import Principal, decode_token, issue_user_token, principal_from_request
from customscripts.config import settings
from customscripts.errors import Invalid, TooLarge, Unauthenticated
from customscripts.http import Event, Request, http_status
from customscripts.permissions import Denied, check_can_use, check_dependency_closure
from customscripts.registry import store
from customscripts.registry.models import DraftCreate, Permissions, ScriptMeta, parse_dependency
from customscripts.registry.validation import check_limits, check_schema, check_source, find_cycle

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


def _req(headers: dict[str, str]) -> Request:
    return Request(Event(headers=headers), {}, "test")


# ----------------------------------------------------------------- auth


def test_token_round_trip():
    token = issue_user_token("u1", "t1", "pro", teams=["a"], orgs=["o"], features=["x"])
    p = principal_from_request(_req({"authorization": f"Bearer {token}"}))
    assert p == Principal("u1", "t1", "pro", frozenset({"x"}), frozenset({"a"}), frozenset({"o"}))


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic dTpw", "Bearer not.a.jwt", "Bearer " + "a" * 9000])
def test_malformed_headers_are_401(header):
    with pytest.raises(Unauthenticated):
        principal_from_request(_req({} if header is None else {"Authorization": header}))


def test_expired_forged_and_unsigned_tokens_are_401():
    now = int(time.time())
    base = {"sub": "u", "tenant": "t", "tier": "pro", "exp": now + 60}
    bad = [
        issue_user_token("u", "t", ttl_s=-1),
        jwt.encode(base, "another-secret-of-sufficient-length-xx", algorithm="HS256"),
        jwt.encode(base, None, algorithm="none"),
        jwt.encode({k: v for k, v in base.items() if k != "exp"}, settings().jwt_secret, algorithm="HS256"),
        jwt.encode({k: v for k, v in base.items() if k != "tenant"}, settings().jwt_secret, algorithm="HS256"),
        jwt.encode({**base, "sub": "../x"}, settings().jwt_secret, algorithm="HS256"),
        jwt.encode({**base, "teams": "notalist"}, settings().jwt_secret, algorithm="HS256"),
        jwt.encode({**base, "teams": ["a/b"]}, settings().jwt_secret, algorithm="HS256"),
    ]
    for token in bad:
        with pytest.raises(Unauthenticated):
            decode_token(token)


# ----------------------------------------------------------------- permissions (pure)


def _meta(**perms) -> ScriptMeta:
    stamp = datetime.now(UTC)
    return ScriptMeta(script_id="s1", version=1, owner_id="owner", tenant="acme", name="n", created_at=stamp,
                      updated_at=stamp, status="published", code_sha256="0" * 64,
                      permissions=Permissions(**perms))


P = {
    "owner": Principal("owner", "acme", "pro"),
    "team": Principal("tm", "acme", "pro", teams=frozenset({"quants"})),
    "org": Principal("om", "acme", "pro", orgs=frozenset({"desk"})),
    "allowed": Principal("al", "acme", "pro"),
    "stranger_same_tenant": Principal("x", "acme", "pro"),
    "other_tenant_same_team": Principal("tm", "globex", "pro", teams=frozenset({"quants"})),
    "free_owner": Principal("owner", "acme", "free"),
}


@pytest.mark.parametrize("who, subscribed, listed, expected", [
    ("owner", False, False, None),
    ("team", False, False, None),
    ("org", False, False, None),
    ("allowed", False, False, None),
    ("stranger_same_tenant", False, False, "not_entitled"),
    ("stranger_same_tenant", True, True, None),
    ("other_tenant_same_team", False, False, "not_entitled"),
    ("other_tenant_same_team", False, True, "not_subscribed"),
    ("other_tenant_same_team", True, False, "not_entitled"),
    ("other_tenant_same_team", True, True, None),
    ("free_owner", False, False, "tier_not_allowed"),
])
def test_check_can_use(who, subscribed, listed, expected):
    meta = _meta(teams=["quants"], orgs=["desk"], allowed_users=["al"], marketplace=listed)
    if expected is None:
        check_can_use(P[who], meta, 1, subscribed=subscribed)
    else:
        with pytest.raises(Denied) as err:
            check_can_use(P[who], meta, 1, subscribed=subscribed)
        assert err.value.code == expected and http_status(err.value) == 403
        assert err.value.hidden == (expected == "not_entitled" and P[who].tenant != "acme")


def test_drafts_are_owner_only_and_restrictions_apply_to_others():
    draft = _meta(teams=["quants"]).model_copy(update={"status": "draft", "version": "draft"})
    check_can_use(P["owner"], draft, "draft")
    with pytest.raises(Denied, match="not a published"):
        check_can_use(P["team"], draft, "draft")
    restricted = _meta(teams=["quants"], tiers=["enterprise"])
    with pytest.raises(Denied) as err:
        check_can_use(P["team"], restricted, 1)
    assert err.value.code == "tier_restricted"
    check_can_use(P["owner"], restricted, 1)  # the owner is never restricted by their own list
    featured = _meta(teams=["quants"], features=["beta"])
    with pytest.raises(Denied):
        check_can_use(P["team"], featured, 1)
    check_can_use(Principal("tm", "acme", "pro", features=frozenset({"beta"}), teams=frozenset({"quants"})),
                  featured, 1)


def test_closure_check_names_the_dependency():
    ok, gated = _meta(teams=["quants"]), _meta(allowed_users=["al"]).model_copy(update={"script_id": "s2"})
    check_dependency_closure(P["team"], [ok])
    with pytest.raises(Denied) as err:
        check_dependency_closure(P["team"], [ok, gated])
    assert err.value.code == "dependency_forbidden" and "s2@1" in err.value.message


# ----------------------------------------------------------------- models and keys


def test_meta_rejects_hostile_ids():
    stamp = datetime.now(UTC)
    good = {"script_id": "s1", "version": 1, "owner_id": "o", "tenant": "t", "name": "n", "created_at": stamp,
            "updated_at": stamp, "status": "published", "code_sha256": "0" * 64}
    ScriptMeta(**good)
    for field, value in [("script_id", "../x"), ("owner_id", "a/b"), ("tenant", "t\x00"), ("version", 0),
                         ("version", "DRAFT"), ("name", "n\x00"), ("code_sha256", "zz")]:
        with pytest.raises(ValidationError):
            ScriptMeta(**{**good, field: value})
    for dep in ("x@0", "x", "x@1@2", "../x@1", "x@\uff11"):
        with pytest.raises(ValidationError):
            DraftCreate(name="n", source="x", depends_on=[dep])
    assert parse_dependency("abc@12") == ("abc", 12)


def test_request_models_are_strict():
    with pytest.raises(ValidationError):
        DraftCreate(name="n", source="x", permissions={"marketplace": 0})
    with pytest.raises(ValidationError):
        DraftCreate(name="n", source="x", limits={"timeout_ms": "100"})
    with pytest.raises(ValidationError):
        DraftCreate(name="n", source="x", extra=1)


def test_keys_follow_the_layout_and_refuse_bad_segments():
    assert store.key("u.1@x", "my-script", 3, "meta.json") == "scripts/u.1@x/my-script/3/meta.json"
    assert store.key("u", "s", "draft", "script.py") == "scripts/u/s/draft/script.py"
    for owner, sid, ver in [("..", "s", 1), ("u", "a/b", 1), ("u", "s", "../1"), ("u\x00", "s", 1),
                            ("u", "\u0455", 1), ("u", "s", "\uff11")]:
        with pytest.raises(Invalid):
            store.key(owner, sid, ver, "script.py")


# ----------------------------------------------------------------- validation


def test_source_checks():
    check_source("def run(ctx):\n    return 1\n")
    check_source("def run(ctx, *, scale=1):\n    return scale\n")
    with pytest.raises(Invalid) as err:
        check_source("def run(ctx):\n  x = = 1\n")
    assert err.value.details["line"] == 2 and err.value.details["column"] >= 1
    with pytest.raises(Invalid, match="run"):
        check_source("def run(a, b):\n    return 1\n")
    with pytest.raises(Invalid):
        check_source("def run(ctx):\n    return '\ud800'\n")
    with pytest.raises(TooLarge):
        check_source("def run(ctx):\n    return 1\n" + "#" * 300_000)
    with pytest.raises(Invalid):
        check_source("x = " + "(" * 10_000 + ")" * 10_000 + "\ndef run(ctx):\n    return 1\n")


def test_schema_checks():
    check_schema({"type": "object", "properties": {"x": {"type": "number"}}}, "input_schema")
    for bad in ({"type": "nope"}, {"pattern": "("}, {"minimum": "1"}, {"$defs": 1}):
        with pytest.raises(Invalid):
            check_schema(bad, "input_schema")


def test_limits_within_tier():
    tier = settings().tiers["pro"]
    from customscripts.registry.models import Limits

    check_limits(Limits(timeout_ms=tier.timeout_ms), tier)
    with pytest.raises(Invalid):
        check_limits(Limits(memory_mb=tier.memory_mb + 1), tier)


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}}, "a") is None
    assert find_cycle({"a": {"a"}}, "a") == ["a"]
    assert find_cycle({"a": {"c"}, "c": {"b"}, "b": {"a"}}, "a") == ["a", "c", "b"]
    deep = {str(i): {str(i + 1)} for i in range(5000)}
    assert find_cycle(deep, "0") is None
    deep["4999"] = {"0"}
    assert len(find_cycle(deep, "0")) == 5000


def test_registry_fn_handler_is_thin_and_answers():
    """The python3-http entry point: handle(event, context) dispatching to the registry router."""
    import importlib.util

    from customscripts.config import REPO_ROOT
    from customscripts.http import Event

    spec = importlib.util.spec_from_file_location("registry_fn_handler", REPO_ROOT / "registry-fn" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = module.handle(Event(method="GET", path="/openapi.json"), None)
    assert doc["statusCode"] == 200 and doc["body"]["openapi"] == "3.1.0"
    denied = module.handle(Event(method="POST", path="/scripts", body=b"{}"), None)
    assert denied["statusCode"] == 401 and denied["body"]["error"]["code"] == "unauthorized"


def test_chosen_script_ids_are_per_tenant():
    from customscripts.registry.namespace import MAX_CHOSEN_ID, is_own, new_script_id, qualify

    a, b = qualify("sma", "tenant-a"), qualify("sma", "tenant-b")
    assert a != b and a.startswith("sma-") and b.startswith("sma-")
    assert qualify(a, "tenant-a") == a  # already this tenant's: unchanged
    assert qualify(a, "tenant-b") != a and is_own(qualify(a, "tenant-b"), "tenant-b")
    assert is_own(new_script_id("tenant-a"), "tenant-a") and not is_own(a, "tenant-b")
    assert len(qualify("x" * MAX_CHOSEN_ID, "t")) == 63
    with pytest.raises(Invalid):
        qualify("x" * (MAX_CHOSEN_ID + 1), "t")
    with pytest.raises(Invalid):
        qualify("../x", "t")


def test_the_latest_version_governs_every_version():
    from customscripts.permissions import check_can_use_now

    user = P["allowed"]
    v1 = _meta(allowed_users=["al"])
    v2 = _meta().model_copy(update={"version": 2})
    check_can_use_now(user, v1, None)
    check_can_use_now(user, v1, v1)
    check_can_use_now(P["owner"], v1, v2)
    with pytest.raises(Denied):
        check_can_use_now(user, v1, v2)  # v2 left the user out: v1 is revoked too
    with pytest.raises(Denied):
        check_can_use_now(user, v2, v1)  # both must allow: an older grant does not open a newer version
    with pytest.raises(Denied):  # dependencies the same way
        check_dependency_closure(user, [v1], current={"s1": v2})


def test_listing_needs_the_marketplace_publish_feature():
    from customscripts.permissions import check_can_list

    with pytest.raises(Denied) as err:
        check_can_list(P["owner"])
    assert err.value.code == "marketplace_publish_required"
    check_can_list(Principal("owner", "acme", "pro", features=frozenset({"marketplace_publish"})))
    check_can_list(Principal("owner", "acme", "enterprise"))
