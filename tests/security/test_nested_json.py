"""Issue 10, item 8: deeply nested JSON is a 400 with a clear code, never a 500, on every parser.

Every route that takes a body or a JSON query parameter, over the real HTTP path: registry-fn and
gateway-fn behind the local provider, the provider's own /system API, and a script function's
handler. The class: arrays, objects and both mixed, at the top of the body and inside otherwise
valid fields, just past the limit and far past it; and nesting within the limit inside params,
schemas and metadata must not 500 anywhere downstream either.
"""

from __future__ import annotations

import json
import urllib.parse
import uuid

import pytest
import requests

from customscripts.gateway.tokens import mint_execution_token
from customscripts.http import MAX_JSON_DEPTH
from customscripts.sandbox.invocation import mint_invocation_token
from tests.integration.registry_support import RUN_OK, Caller, error_code

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

DEPTHS = (MAX_JSON_DEPTH + 1, 1_000, 100_000)


def deep_texts(depth: int) -> dict[str, str]:
    """JSON texts nesting `depth` levels: arrays, objects, and the two alternating."""
    half = depth // 2 + 1
    return {
        "arrays": "[" * depth + "1" + "]" * depth,
        "objects": '{"a":' * depth + "1" + "}" * depth,
        "mixed": '[{"a":' * half + "1" + "}]" * half,
    }


def nested(depth: int) -> object:
    """A Python value nesting `depth` levels (objects in arrays), built without recursion."""
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def in_field(body: dict, field: str, text: str) -> bytes:
    """`body` with `field` replaced by the raw JSON `text`."""
    marker = "__DEEP__"
    return json.dumps({**body, field: marker}).replace(f'"{marker}"', text).encode()


def assert_too_deep(resp: requests.Response, where: str) -> None:
    assert resp.status_code == 400, (where, resp.status_code, resp.text[:300])
    assert error_code(resp) == "json_too_deep", (where, resp.text[:300])


@pytest.fixture(scope="module")
def world(api):
    u = uuid.uuid4().hex[:8]
    owner = Caller(api, f"deep-owner-{u}", f"deep-tenant-{u}")
    sid = owner.sid(f"deep-target-{u}")
    owner.create_published(sid)
    ok = owner.call("POST", f"/scripts/{sid}/execute", {"instrument_key": "GOOG", "timeframe": "1d"})
    assert ok.status_code == 200, ok.text  # its function is deployed and running
    return owner, sid


BODY_ROUTES = [
    # (method, path template, a valid body, the fields that take nested JSON)
    ("POST", "/scripts", {"name": "n", "source": RUN_OK}, ("input_schema", "output_schema", "permissions", "limits")),
    ("PUT", "/scripts/{sid}", {"description": "d"}, ("input_schema", "permissions", "depends_on")),
    ("PATCH", "/scripts/{sid}", {"description": "d"}, ("output_schema", "limits")),
    ("POST", "/scripts/{sid}/execute", {"instrument_key": "GOOG", "timeframe": "1d"}, ("params", "version")),
    ("POST", "/scripts/{sid}/subscribe", {"instrument_key": "GOOG", "timeframe": "1d"}, ("params",)),
    ("POST", "/scripts/{sid}/publish", {}, ("anything",)),
    ("POST", "/scripts/{sid}/marketplace/subscribe", {}, ("anything",)),
]


@pytest.mark.parametrize("method, template, body, fields", BODY_ROUTES)
def test_registry_bodies_nested_too_deep_are_400(world, method, template, body, fields):
    owner, sid = world
    path = template.format(sid=sid)
    for depth in DEPTHS:
        for shape, text in deep_texts(depth).items():
            if method == "POST" and template.endswith(("publish", "marketplace/subscribe")):
                # routes that read no body: whatever is sent, it is never a 500
                assert owner.call(method, path, raw=text.encode()).status_code < 500
                continue
            assert_too_deep(owner.call(method, path, raw=text.encode()), f"{path} top {shape} {depth}")
            for field in fields:
                resp = owner.call(method, path, raw=in_field(body, field, text))
                assert_too_deep(resp, f"{path} {field} {shape} {depth}")


def test_nesting_within_the_limit_never_500s_downstream(world, uid):
    """Params, schemas and output metadata nested right up to the limit: pydantic, jsonschema, the
    params hash, canonical hashes and storage all cope (a 4xx or a 200, never a 500)."""
    owner, _sid = world
    depth = MAX_JSON_DEPTH - 3  # room for the body's own levels around the field
    deep = nested(depth)
    # schemas: deeply nested but valid, and one that recurses through $ref on nested params
    recursive = {"type": "object", "properties": {"k": {"$ref": "#"}}}
    for n, schema in enumerate(({"type": "object", "properties": {"k": deep}}, recursive, {"$ref": "#"})):
        resp = owner.create(f"schema{n}-{uid}", input_schema=schema)
        assert resp.status_code in (201, 422), resp.text[:300]
    sid = owner.sid(f"meta-{uid}")
    metadata = json.dumps({"d": nested(40)})
    owner.create_published(sid, f"def run(ctx):\n    return {{'value': 1.0, 'metadata': {metadata}}}\n",
                           input_schema=recursive)
    params = {"k": nested(depth - 1)}
    for body in ({"params": params}, {"params": params, "store": True}):
        resp = owner.call("POST", f"/scripts/{sid}/execute", {"instrument_key": "GOOG", "timeframe": "1d", **body})
        assert resp.status_code in (200, 422), resp.text[:300]
    sub = owner.call("POST", f"/scripts/{sid}/subscribe", {"instrument_key": "GOOG", "timeframe": "1d",
                                                         "params": params, "backfill": 0})
    assert sub.status_code < 500, sub.text[:300]
    if sub.status_code in (200, 201):  # leave no live subscription behind
        owner.call("DELETE", f"/scripts/{sid}/subscriptions/{sub.json()['id']}")
    edit = owner.call("PATCH", f"/scripts/{sid}", {"permissions": {"teams": ["t"]}, "input_schema": {"k": deep}})
    assert edit.status_code < 500, edit.text[:300]
    # A schema that recurses without end is caught when saved, and never reaches execute as a 500.
    resp = owner.create(f"loop-{uid}", input_schema={"$ref": "#"})
    assert resp.status_code == 422 and error_code(resp) == "invalid_schema"
    guarded = owner.sid(f"guarded-{uid}")
    owner.create_published(guarded, input_schema={"properties": {"a": {"anyOf": [{"type": "object"},
                                                                               {"$ref": "#/properties/a"}]}}})
    resp = owner.call("POST", f"/scripts/{guarded}/execute",
                      {"instrument_key": "GOOG", "timeframe": "1d", "params": {"a": 5}})
    assert resp.status_code == 422 and error_code(resp) == "invalid_params", resp.text[:300]


def test_json_query_parameters_nested_too_deep_are_400(api, stack, world):
    owner, sid = world
    token = mint_execution_token(user=owner.user_id, tenant=owner.tenant, script_id=owner.sid("deep-reader"),
                                 version=1, deps=[f"{sid}@1"], as_of=1.6e9, tier="pro")
    gateway = stack.data_gateway_url
    for depth in DEPTHS:
        for shape, text in deep_texts(depth).items():
            if depth > 1_000:
                text = deep_texts(2_000)[shape]  # what fits in a request line; the class is the same
            q = urllib.parse.quote(text)
            resp = owner.call("GET", f"/signals/GOOG/custom/{sid}?timeframe=1d&params={q}")
            assert_too_deep(resp, f"signals {shape} {depth}")
            for route in ("latest", "history"):
                for base in (gateway, f"{stack.provider_url}/function/gateway-fn"):
                    resp = requests.get(f"{base}/data/scripts/{sid}/{route}?instrument_key=GOOG&timeframe=1d"
                                        f"&params={q}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
                    assert_too_deep(resp, f"gateway {route} {shape} {depth}")


def test_provider_system_api_nested_too_deep_is_400(stack):
    auth = (stack.openfaas_user, stack.openfaas_password)
    for depth in DEPTHS:
        for shape, text in deep_texts(depth).items():
            for method in ("POST", "PUT", "DELETE"):
                resp = requests.request(method, f"{stack.provider_url}/system/functions", data=text.encode(),
                                        auth=auth, timeout=30)
                assert resp.status_code == 400, (method, shape, depth, resp.status_code, resp.text[:200])
                assert "nests" in resp.text or "deep" in resp.text, resp.text[:200]
            body = json.dumps({"service": "x", "image": "y", "labels": "__DEEP__"}).replace('"__DEEP__"', text)
            resp = requests.post(f"{stack.provider_url}/system/functions", data=body, auth=auth, timeout=30)
            assert resp.status_code == 400, (shape, depth, resp.text[:200])


def test_script_function_bodies_nested_too_deep_are_400(stack, world):
    """The handler every script version runs, reached as registry-fn and the scheduler reach it."""
    from customscripts.faas.naming import function_name

    owner, sid = world
    name = function_name(sid, 1)
    token = mint_invocation_token(name, {"user": owner.user_id, "tenant": owner.tenant})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = f"{stack.provider_url}/function/{name}"
    item = {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": 1.6e9, "params": {}}
    for depth in DEPTHS:
        for shape, text in deep_texts(depth).items():
            for raw in (text.encode(), in_field(item, "params", text), in_field({"items": [item]}, "prefetch", text)):
                resp = requests.post(url, data=raw, headers=headers, timeout=60)
                assert_too_deep(resp, f"{name} {shape} {depth}")
