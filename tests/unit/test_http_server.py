"""HandlerServer (every function process, LocalServer) answers exactly as the upstream python3-http adapter
(tests/python3_http_reference.py)."""

from __future__ import annotations

import threading

import pytest
import requests
from waitress.server import create_server

from customscripts.http import Event, KeepAlivePool, LocalServer, http_status, json_response, python3_http_result
from tests.python3_http_reference import flask_app


def handle(event: Event, context) -> dict | str | tuple | None:
    if event.path == "/text":
        return {"statusCode": 201, "body": "plain", "headers": {"X-Thing": "1"}}
    if event.path == "/none":
        return None
    if event.path == "/raw":
        return "just a string"
    if event.path == "/bytes":  # a binary body, as gateway-fn answers a columns read
        return python3_http_result({"statusCode": 203, "body": b"\x00\xff\x10raw",
                                    "headers": {"Content-Type": "application/vnd.test", "X-Thing": "2"}})
    if event.path == "/typed":
        return {"statusCode": 200, "body": '{"a":1}', "headers": {"Content-Type": "application/json"}}
    return json_response({"method": event.method, "path": event.path, "query": dict(event.query),
                          "body": event.body.decode(), "auth": event.headers.get("authorization"),
                          "b": [1, 2.5, None, "é"]}, 200, {"X-Call-Id": "c1"})


@pytest.fixture(scope="module")
def servers():
    flask_server = create_server(flask_app(handle), host="127.0.0.1", port=0, threads=2,
                                 clear_untrusted_proxy_headers=False)
    threading.Thread(target=flask_server.run, daemon=True).start()
    lean = LocalServer(handle).start()
    yield f"http://127.0.0.1:{flask_server.effective_port}", lean.url
    lean.stop()
    flask_server.close()


CASES = [
    ("GET", "/x/y?b=2&a=1&a=3&e=", None),
    ("POST", "/scripts/s1/execute", b'{"k": 1}'),
    ("PUT", "/%E2%82%AC/caf%C3%A9", b"x"),
    ("DELETE", "/", None),
    ("OPTIONS", "/o", None),
    ("HEAD", "/h", None),
    ("GET", "/text", None),
    ("GET", "/none", None),
    ("GET", "/raw", None),
    ("GET", "/typed", None),
    ("GET", "/bytes", None),
    ("GET", "/line%0Abreak", None),
    ("TRACE", "/t", None),
]


@pytest.mark.parametrize(("method", "path", "body"), CASES)
def test_lean_server_answers_like_flask(servers, method, path, body):
    flask_url, lean_url = servers
    answers = []
    for base in (flask_url, lean_url):
        resp = requests.request(method, base + path, data=body, headers={"Authorization": "Bearer t"}, timeout=10)
        answers.append((resp.status_code, resp.content, resp.headers.get("Content-Type"),
                        resp.headers.get("X-Thing"), resp.headers.get("X-Call-Id")))
    flask_answer, lean_answer = answers
    if method == "TRACE":  # both refuse it with a JSON 405 naming the allowed methods
        assert flask_answer[0] == lean_answer[0] == 405 and b"method_not_allowed" in lean_answer[1]
        return
    if flask_answer[0] == 404 and b"no_route" in flask_answer[1]:  # rejected before the handler
        assert lean_answer[0] == 404 and b"no_route" in lean_answer[1]
        return
    assert lean_answer == flask_answer


def test_oversized_bodies_are_413_with_a_json_error(servers):
    _, lean_url = servers
    resp = requests.post(lean_url + "/big", data=b"x" * (8 * (1 << 20) + 1), timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"


def test_keep_alive_pool_reuses_connections_and_survives_a_server_restart(servers):
    _, lean_url = servers
    pool, prefix = KeepAlivePool.for_url(lean_url)
    first = pool.request("GET", prefix + "/a?q=1", headers={"Authorization": "Bearer one"})
    second = pool.request("GET", prefix + "/b", headers={"Authorization": "Bearer two"})
    assert first.status == second.status == 200
    assert first.json()["auth"] == "Bearer one" and second.json()["auth"] == "Bearer two"  # nothing shared
    assert first.headers.get("x-call-id") == "c1"
    # the server drops every connection: the pool notices the dead idle one and reconnects
    server = LocalServer(handle).start()
    pool, prefix = KeepAlivePool.for_url(server.url)
    assert pool.request("GET", "/c").status == 200
    server.server.drop_connections()
    assert pool.request("POST", "/d", b"{}").json()["body"] == "{}"
    server.stop()


def test_binary_bodies_go_out_as_sent(servers):
    for base in servers:
        resp = requests.get(base + "/bytes", timeout=10)
        assert (resp.status_code, resp.content) == (203, b"\x00\xff\x10raw")
        assert resp.headers["Content-Type"] == "application/vnd.test" and resp.headers["X-Thing"] == "2"


@pytest.mark.parametrize("text, code", [
    ("[" * 65 + "]" * 65, "json_too_deep"),
    ('{"a":' * 65 + "1" + "}" * 65, "json_too_deep"),
    ("[" * 200_000 + "]" * 200_000, "json_too_deep"),  # past the decoder's own recursion limit
    ('{"x": NaN}', "invalid_json"),
    ("[Infinity]", "invalid_json"),
    ('{"t": 1e999}', "invalid_json"),  # overflows to inf
    ("[1", "invalid_json"),
    (b"\xff\xfe{", "invalid_json"),
])
def test_parse_json_refuses_what_is_not_strict_bounded_json(text, code):
    from customscripts.errors import Malformed
    from customscripts.http import parse_json

    with pytest.raises(Malformed) as err:
        parse_json(text if isinstance(text, bytes) else text.encode())
    assert err.value.code == code and http_status(err.value) == 400


def test_parse_json_takes_json_up_to_the_depth_limit():
    from customscripts.http import MAX_JSON_DEPTH, json_depth, parse_json

    text = "[" * MAX_JSON_DEPTH + "1e300" + "]" * MAX_JSON_DEPTH
    value = parse_json(text)
    assert json_depth(value) == MAX_JSON_DEPTH
    assert parse_json(b'{"a": [1, 2.5e-5, "e400", {"b": null}]}') == {"a": [1, 2.5e-5, "e400", {"b": None}]}
    assert json_depth(1) == 0 and json_depth({"a": [{}]}) == 3
