"""The local provider driven with the exact REST calls faas-cli makes (docs/openfaas.md §4.3, §5).

A small python3-http echo function is built from a tmp template through `render_context`, deployed
with PUT -> 404 -> POST, listed, described, invoked (path/query mapping, X-Call-Id), invoked async
with a callback to a loopback LocalServer, cold-started, idle-stopped, crash-restarted and removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from customscripts.config import REPO_ROOT, settings
from customscripts.execution import Invoker, Scope
from customscripts.faas import build
from customscripts.faas.budget import FunctionBudget
from customscripts.faas.client import FaasError, FunctionNotFound, NotListening, OpenFaaSClient
from customscripts.faas.naming import SERVICE_PORT_ANNOTATION
from customscripts.http import Event, LocalServer
from customscripts.local.provider import Provider
from tests.waiting import wait_until

ECHO_HANDLER = '''
import json, os, time

def handle(event, context):
    if event.path == "/crash":
        os._exit(3)
    if event.path == "/sleep":
        time.sleep(float(event.query.get("s", "1")))
    here = os.path.dirname(__file__)
    secrets_dir = os.environ.get("CS_SECRETS_DIR", "")
    secret_file = os.path.join(secrets_dir, "invocation-secret")
    return {"statusCode": int(event.query.get("status", 200)), "headers": {"X-Echo": "yes"}, "body": {
        "pid": os.getpid(), "method": event.method, "path": event.path, "query": dict(event.query),
        "body": event.body.decode(), "call_id": event.headers.get("X-Call-Id"),
        "start_time": event.headers.get("X-Start-Time"), "hostname": context.hostname,
        "secret": open(secret_file).read() if os.path.exists(secret_file) else None,
        "secret_env": os.environ.get("CS_INVOCATION_SECRET"),
        "gateway_url": os.environ.get("CS_GATEWAY_URL"), "cwd": os.getcwd(),
        "script": os.path.exists(os.path.join(here, "script.py")),
    }}
'''

AUTH = ("admin", "test-password")


def make_template(root: Path) -> Path:
    """A templates folder: the real python3-http language template, and an echo function (no
    third-party requirements) as the handler folder every version is built with."""
    tpl = root / "templates"
    shutil.copytree(REPO_ROOT / "templates" / build.LANGUAGE, tpl / build.LANGUAGE)
    (tpl / build.SCRIPT_HANDLER).mkdir()
    (tpl / build.SCRIPT_HANDLER / "handler.py").write_text(ECHO_HANDLER)
    (tpl / build.SCRIPT_HANDLER / "requirements.txt").write_text("")
    return tpl


def version_spec(tpl: Path, functions: Path, script_id: str, version: int) -> dict:
    """Render a version's context (with the real package copy) and return its FunctionDeployment body."""
    code = f"def run(ctx):\n    return {version}\n"
    result = build.render_context(script_id, version, code, {"script_id": script_id, "version": version},
                                  templates_dir=tpl, functions_dir=functions)
    return build.deployment(script_id, version, owner_id="u1", tenant="t1", code_hash=result.code_sha256,
                            tier="pro", templates_dir=tpl, gateway_url="http://gw.test",
                            context_hash=result.context_sha256)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Provider, OpenFaaSClient, Path, Path]]:
    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    provider = Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=functions, idle_s=60,
                        user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s3cret"}).start()
    client = OpenFaaSClient(provider.url, *AUTH)
    try:
        yield provider, client, tpl, functions
    finally:
        client.close()
        provider.stop()


def test_faas_cli_flow(env) -> None:
    provider, client, tpl, functions = env
    spec = version_spec(tpl, functions, "echo", 1)
    base = provider.url
    # faas-cli deploy: PUT first ...
    put = requests.put(f"{base}/system/functions", json=spec, auth=AUTH)
    assert put.status_code == 404
    # ... then POST on 404
    post = requests.post(f"{base}/system/functions", json=spec, auth=AUTH)
    assert post.status_code == 202
    # creating an existing name fails like faas-netes (500); updating it is a PUT (202)
    assert requests.post(f"{base}/system/functions", json=spec, auth=AUTH).status_code == 500
    assert requests.put(f"{base}/system/functions", json=spec, auth=AUTH).status_code == 202
    assert client.deploy(spec) == 202

    # faas-cli list / describe
    listed = requests.get(f"{base}/system/functions", auth=AUTH).json()
    assert [f["name"] for f in listed] == ["cs-echo-v1"]
    status = requests.get(f"{base}/system/function/cs-echo-v1", params={"namespace": "", "usage": "1"},
                          auth=AUTH).json()
    for key in ("name", "image", "envProcess", "labels", "annotations", "limits", "replicas",
                "availableReplicas", "invocationCount", "createdAt", "readOnlyRootFilesystem", "envVars"):
        assert key in status, key
    assert status["image"] == spec["image"] and status["labels"] == spec["labels"]
    assert status["availableReplicas"] == 0  # not started until the first call
    assert status["namespace"] == "openfaas-fn"

    # faas-cli invoke: path + query mapping, X-Call-Id generated and returned
    resp = requests.post(f"{base}/function/cs-echo-v1/a/b?x=1&y=2", data=b"hello")
    assert resp.status_code == 200
    body = resp.json()
    assert body["path"] == "/a/b" and body["query"] == {"x": "1", "y": "2"}
    assert body["body"] == "hello" and body["method"] == "POST"
    assert resp.headers["X-Call-Id"] == body["call_id"] and len(body["call_id"]) == 36
    assert resp.headers["X-Start-Time"] == body["start_time"]
    assert resp.headers["X-Echo"] == "yes" and resp.headers["Content-Type"] == "application/json"
    assert "X-Duration-Seconds" in resp.headers
    # a bare /function/<name> arrives as "/", a caller's X-Call-Id is kept, namespace suffix accepted
    resp = requests.get(f"{base}/function/cs-echo-v1.openfaas-fn", headers={"X-Call-Id": "my-call-1"})
    assert resp.json()["path"] == "/" and resp.json()["call_id"] == "my-call-1"
    assert resp.headers["X-Call-Id"] == "my-call-1"
    # the function's own status passes through
    assert requests.get(f"{base}/function/cs-echo-v1?status=418").status_code == 418
    # deployment env, secrets as files only, cwd = the build context, script next to the handler
    body = client.invoke("cs-echo-v1", b"").json()
    assert body["secret"] == "s3cret" and body["secret_env"] is None
    assert body["gateway_url"] == "http://gw.test"
    assert Path(body["cwd"]) == (functions / "cs-echo-v1").resolve()
    assert body["script"] is True
    assert client.describe("cs-echo-v1")["availableReplicas"] == 1
    assert client.describe("cs-echo-v1")["invocationCount"] == 4

    # faas-cli remove
    delete = requests.delete(f"{base}/system/functions", json={"functionName": "cs-echo-v1", "namespace": ""},
                             auth=AUTH)
    assert delete.status_code == 202
    assert requests.delete(f"{base}/system/functions", json={"functionName": "cs-echo-v1"},
                           auth=AUTH).status_code == 404
    assert requests.get(f"{base}/system/function/cs-echo-v1", auth=AUTH).status_code == 404
    assert requests.post(f"{base}/function/cs-echo-v1").status_code == 404
    assert provider.running() == []
    with pytest.raises(FunctionNotFound):
        client.invoke("cs-echo-v1")
    with pytest.raises(FunctionNotFound):
        client.describe("cs-echo-v1")
    with pytest.raises(FunctionNotFound):
        client.delete("cs-echo-v1")


def test_async_invoke_with_callback(env) -> None:
    provider, client, tpl, functions = env
    client.deploy(version_spec(tpl, functions, "echo", 1))
    received: queue.Queue = queue.Queue()

    def callback(event: Event, context) -> dict:
        received.put((dict(event.headers), event.body, event.path))
        return {"statusCode": 200, "body": ""}

    server = LocalServer(callback).start()
    try:
        call_id = client.invoke_async("cs-echo-v1", b"later", callback_url=f"{server.url}/done", path="/p/q")
        assert call_id
        headers, body, path = received.get(timeout=20)
        assert path == "/done"
        assert headers["X-Call-Id"] == call_id
        assert headers["X-Function-Status"] == "200"
        assert headers["X-Function-Name"] == "cs-echo-v1"
        assert float(headers["X-Duration-Seconds"]) > 0
        result = json.loads(body)
        assert result["body"] == "later" and result["path"] == "/p/q" and result["call_id"] == call_id
    finally:
        server.stop()
    # raw: 202 + X-Call-Id, even without a callback; bad callback URL is 400; unknown function 404
    resp = requests.post(f"{provider.url}/async-function/cs-echo-v1", data=b"x")
    assert resp.status_code == 202 and resp.headers["X-Call-Id"]
    resp = requests.post(f"{provider.url}/async-function/cs-echo-v1", headers={"X-Callback-Url": "nope"})
    assert resp.status_code == 400
    assert requests.post(f"{provider.url}/async-function/nope").status_code == 404
    assert requests.get(f"{provider.url}/async-function/cs-echo-v1").status_code == 405


def test_auth_and_validation(env) -> None:
    provider, client, tpl, functions = env
    base = provider.url
    spec = version_spec(tpl, functions, "echo", 1)
    assert requests.get(f"{base}/system/functions").status_code == 401
    assert requests.get(f"{base}/system/functions", auth=("admin", "wrong")).status_code == 401
    assert requests.get(f"{base}/system/info").status_code == 401
    assert requests.get(f"{base}/healthz").status_code == 200
    info = client.info()
    assert info["provider"]["provider"] == "customscripts-local"
    assert info["provider"]["orchestration"] == "process"
    assert client.healthz()

    def post(body: object, raw: bytes | None = None) -> int:
        data = raw if raw is not None else json.dumps(body).encode()
        return requests.post(f"{base}/system/functions", data=data, auth=AUTH).status_code

    assert post(None, b"{not json") == 400
    assert post([1, 2]) == 400
    assert post({**spec, "service": "Bad_Name"}) == 400
    assert post({**spec, "service": "x" * 64}) == 400
    assert post({**spec, "image": ""}) == 400
    assert post({**spec, "namespace": "other"}) == 400
    assert post({**spec, "envVars": {"A": 1}}) == 400
    assert post({**spec, "secrets": ["no-such-secret"]}) == 400
    assert post({**spec, "labels": {"a": "x" * 64}}) == 400
    assert post({**spec, "service": "cs-missing-v1"}) == 400  # no build context for it
    assert requests.delete(f"{base}/system/functions", json={}, auth=AUTH).status_code == 400
    assert client.list() == []
    with pytest.raises(FaasError) as err:
        client.deploy({**spec, "service": "Bad"})
    assert err.value.status == 400


def test_cold_start_idle_stop_and_crash_restart(tmp_path: Path) -> None:
    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    with Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=functions, idle_s=0.6,
                  user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s"}) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        client.deploy(version_spec(tpl, functions, "echo", 1))
        assert provider.running() == []
        started = time.perf_counter()
        pid1 = client.invoke("cs-echo-v1").json()["pid"]
        cold = time.perf_counter() - started
        print(f"cold start {cold * 1000:.0f} ms")
        assert provider.running() == ["cs-echo-v1"]
        assert client.invoke("cs-echo-v1").json()["pid"] == pid1  # warm
        # idle stop after function_idle_s without calls
        deadline = time.monotonic() + 10
        while provider.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert provider.running() == []
        assert client.describe("cs-echo-v1")["availableReplicas"] == 0
        pid2 = client.invoke("cs-echo-v1").json()["pid"]
        assert pid2 != pid1
        # a crash answers 500 for that call, and the next call restarts the function
        assert client.invoke("cs-echo-v1", path="/crash").status == 500
        pid3 = client.invoke("cs-echo-v1").json()["pid"]
        assert pid3 != pid2
        # a long call is not idle-stopped while in flight
        assert client.invoke("cs-echo-v1", path="/sleep", params={"s": "1.2"}).status == 200
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_service_port_function_is_always_served_there_too(tmp_path: Path) -> None:
    """gateway-fn's local Service: started at deploy, served on its fixed port and behind
    /function/<name>, never idle-stopped, restarted when it dies, gone when removed."""
    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    port = _free_port()
    with Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=functions, idle_s=0.4,
                  user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s"}) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        spec = version_spec(tpl, functions, "svc", 1)
        spec["annotations"][SERVICE_PORT_ANNOTATION] = str(port)
        client.deploy(spec)
        assert provider.running() == ["cs-svc-v1"]  # no call needed
        direct = f"http://127.0.0.1:{port}"
        pid1 = requests.get(f"{direct}/x", timeout=5).json()["pid"]
        assert client.invoke("cs-svc-v1").json()["pid"] == pid1
        time.sleep(1.5)  # well past idle_s
        assert requests.get(direct, timeout=5).json()["pid"] == pid1
        with pytest.raises(requests.ConnectionError):  # it dies ...
            requests.get(f"{direct}/crash", timeout=5)
        deadline = time.monotonic() + 10
        pid2 = None
        while pid2 is None and time.monotonic() < deadline:  # ... and is back without a gateway call
            with contextlib.suppress(requests.ConnectionError):
                pid2 = requests.get(direct, timeout=5).json()["pid"]
            time.sleep(0.05)
        assert pid2 is not None and pid2 != pid1
        client.delete("cs-svc-v1")
        assert provider.running() == []
        time.sleep(1.0)
        with pytest.raises(requests.ConnectionError):
            requests.get(direct, timeout=5)
        client.close()


def test_update_restarts_and_state_survives_restart(tmp_path: Path) -> None:
    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    kwargs = dict(state_dir=tmp_path / "state", functions_dir=functions, idle_s=60, user=AUTH[0],
                  password=AUTH[1], secrets={"invocation-secret": "s"})
    with Provider("127.0.0.1", 0, **kwargs) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        spec = version_spec(tpl, functions, "echo", 1)
        client.deploy(spec)
        pid1 = client.invoke("cs-echo-v1").json()["pid"]
        client.deploy(spec)  # unchanged spec: keeps running
        assert client.invoke("cs-echo-v1").json()["pid"] == pid1
        client.deploy({**spec, "envVars": {**spec["envVars"], "CS_GATEWAY_URL": "http://other"}})
        body = client.invoke("cs-echo-v1").json()
        assert body["pid"] != pid1 and body["gateway_url"] == "http://other"
        client.close()
    assert (tmp_path / "state" / "provider" / "functions.json").is_file()
    with Provider("127.0.0.1", 0, **kwargs) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        assert [f["name"] for f in client.list()] == ["cs-echo-v1"]
        assert client.describe("cs-echo-v1")["invocationCount"] == 3
        assert client.invoke("cs-echo-v1").json()["gateway_url"] == "http://other"
        client.close()


def test_platform_function_from_handler_folder(tmp_path: Path) -> None:
    """registry-fn / gateway-fn style: a handler folder in a stack.yml, rendered with the stack's copy."""
    handler_dir = tmp_path / "hello-fn"
    handler_dir.mkdir()
    (handler_dir / "handler.py").write_text(ECHO_HANDLER)
    shutil.copytree(REPO_ROOT / "customscripts", tmp_path / "customscripts")
    (tmp_path / "stack.yml").write_text(
        "version: 1.0\nprovider:\n  name: openfaas\n  gateway: http://127.0.0.1:8080\n"
        "configuration:\n  copy:\n    - ./customscripts\n"
        "functions:\n  hello-fn:\n    lang: python3-http\n    handler: ./hello-fn\n"
        "    image: ${PREFIX:-local}/hello-fn:latest\n    environment:\n      CS_GATEWAY_URL: http://g\n"
        "    secrets: [invocation-secret]\n    readonly_root_filesystem: true\n"
    )
    bodies = build.stack_deployments(tmp_path / "stack.yml", environ={}, functions_dir=tmp_path / "functions")
    assert bodies[0]["image"] == "local/hello-fn:latest"
    with Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=tmp_path / "functions",
                  user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s"}) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        for body in bodies:
            client.deploy(body)
        result = client.invoke("hello-fn", b"hi", path="/x").json()
        assert result["path"] == "/x" and result["gateway_url"] == "http://g" and result["secret"] == "s"
        client.close()


def test_round_trip_latency(env) -> None:
    """Prints p50/p99 of a provider round trip to a warm echo function (figures, not assertions)."""
    _provider, client, tpl, functions = env
    client.deploy(version_spec(tpl, functions, "echo", 1))
    client.invoke("cs-echo-v1")
    samples = []
    for _ in range(2000):
        started = time.perf_counter()
        client.invoke("cs-echo-v1", b"x")
        samples.append(time.perf_counter() - started)
    samples.sort()
    print(f"provider round trip over 2000 calls: p50 {samples[1000] * 1000:.2f} ms "
          f"p99 {samples[1980] * 1000:.2f} ms")
    assert settings() is not None


def test_every_function_has_its_own_address_and_calls_there_count_as_activity(tmp_path: Path) -> None:
    """The FunctionStatus names each function's loopback port (its local Service). Nothing answers
    there before the first call starts it; afterwards calls there skip the gateway (not counted as
    invocations) yet keep the function from being idle-stopped; once they stop, it is stopped."""
    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    with Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=functions, idle_s=1.5,
                  user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s"}) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        client.deploy(version_spec(tpl, functions, "echo", 1))
        url = client.function_url("cs-echo-v1")
        assert url == f"http://127.0.0.1:{client.describe('cs-echo-v1')['annotations'][SERVICE_PORT_ANNOTATION]}"
        with pytest.raises(NotListening):  # not started yet: the request was not sent
            client.invoke_at(url, b"x")
        pid = client.invoke("cs-echo-v1", b"x").json()["pid"]  # the gateway starts it
        for _ in range(16):  # 4 s of direct calls, well past idle_s
            assert client.invoke_at(url, b"y").json()["pid"] == pid
            time.sleep(0.25)
        assert provider.running() == ["cs-echo-v1"]
        assert client.describe("cs-echo-v1")["invocationCount"] == 1  # only the gateway's own call
        assert wait_until(lambda: provider.running() == [], timeout=10)  # quiet: idle-stopped
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)  # and gone
        with pytest.raises(NotListening):
            client.invoke_at(url, b"z")
        client.close()


def test_the_invoker_calls_running_functions_directly_and_falls_back_to_the_gateway(env) -> None:
    provider, client, tpl, functions = env
    client.deploy(version_spec(tpl, functions, "echo", 1))
    invoker = Invoker(None, client, FunctionBudget(client, budget=5))  # type: ignore[arg-type]
    invoker.function_for = lambda script_id, version, tenant: "cs-echo-v1"  # type: ignore[method-assign]
    scope = Scope("u1", "t1", "pro")

    def call() -> int:
        return invoker.invoke("echo", 1, {"k": 1}, scope, "call-1")["pid"]

    def gateway_calls() -> int:
        return client.describe("cs-echo-v1")["invocationCount"]

    first = call()  # not running: through the gateway, which starts it
    assert gateway_calls() == 1
    assert [call() for _ in range(5)] == [first] * 5
    assert gateway_calls() == 1  # the rest went to its own address
    provider.stop_function("cs-echo-v1")
    second = call()  # nothing listens there any more: the gateway again
    assert second != first and gateway_calls() == 2
    assert call() == second and gateway_calls() == 2


def test_each_tenants_functions_share_one_cpu_group(tmp_path: Path) -> None:
    """Script functions run in their tenant's CPU group (faas/cpugroups.py): two of one tenant share
    one, another tenant's is another, and platform functions (no tenant) stay outside all of them."""
    from customscripts.faas import cpugroups

    if cpugroups.tenant_group("probe-tenant", 1024) is None:
        pytest.skip("no writable cgroup cpu controller on this machine (not root, or no delegation)")
    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    with Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=functions, idle_s=60,
                  user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s"}) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        specs = [version_spec(tpl, functions, "echo", 1), version_spec(tpl, functions, "echo", 2),
                 version_spec(tpl, functions, "other", 1)]
        specs[2]["annotations"][build.TENANT_ANNOTATION] = "t2"
        platform = dict(version_spec(tpl, functions, "plat", 1), service="cs-plat-v1")
        platform["annotations"] = {k: v for k, v in platform["annotations"].items()
                                   if k != build.TENANT_ANNOTATION}
        groups = {}
        for spec in [*specs, platform]:
            client.deploy(spec)
            pid = client.invoke(spec["service"]).json()["pid"]
            cpu_line = next(line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                            if line.split(":")[1] in ("cpu", "cpu,cpuacct", ""))
            groups[spec["service"]] = cpu_line.rsplit(":", 1)[1]
        client.close()
    a1, a2, b, plat = (groups[s["service"]] for s in [*specs, platform])
    assert a1 == a2 and cpugroups.PREFIX in a1
    assert b != a1 and cpugroups.PREFIX in b
    assert cpugroups.PREFIX not in plat


def test_the_idle_reaper_never_stops_a_function_a_call_is_using(tmp_path: Path) -> None:
    """A call takes its process, and the reaper decides a process is idle and removes it, each in one
    step under the provider's lock: a process a call holds is not idle (stop refused, the call
    answers), one idle long enough is stopped, and a call never gets a process being killed. Then
    calls arriving about when the function turns idle, in a bounded loop on loopback, all answer."""
    import random
    import threading

    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    rng = random.Random(7)
    with Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=functions, idle_s=0.1,
                  user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s"}) as provider:
        client = OpenFaaSClient(provider.url, *AUTH)
        client.deploy(version_spec(tpl, functions, "edge", 1))
        pid = client.invoke("cs-edge-v1").json()["pid"]
        held: list[int] = []
        call = threading.Thread(target=lambda: held.append(
            client.invoke("cs-edge-v1", path="/sleep", params={"s": "1.0"}).status))
        call.start()
        while not provider.processes["cs-edge-v1"].inflight:
            time.sleep(0.01)
        assert provider.stop_function("cs-edge-v1", idle_for=0.0) is False  # in use: not idle
        call.join(timeout=30)
        assert held == [200] and provider.processes["cs-edge-v1"].proc.pid == pid
        assert provider.stop_function("cs-edge-v1", idle_for=60.0) is False  # used a moment ago
        assert provider.stop_function("cs-edge-v1", idle_for=0.0) is True
        assert "cs-edge-v1" not in provider.processes

        statuses, pids = [], set()
        for _ in range(60):
            reply = client.invoke("cs-edge-v1", path="/sleep", params={"s": "0.02"})
            statuses.append(reply.status)
            if reply.status == 200:
                pids.add(reply.json()["pid"])
            time.sleep(rng.uniform(0.07, 0.13))  # about when the reaper finds it idle
        client.close()
    assert statuses == [200] * len(statuses), statuses
    assert len(pids) > 1  # the reaper did stop it between calls
