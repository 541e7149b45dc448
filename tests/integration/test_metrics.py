"""Metrics and health of every component on the real local stack (customscripts/metrics.py): after a one-time
execute and a realtime event, each component's /metrics shows its counters and histograms move (values
compared before and after, never absolute); health routes answer; readiness names a dependency that is
down; nothing a caller sends through the gateway reaches a /metrics, and no label carries a caller's data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from customscripts import metrics
from customscripts.faas.naming import function_name
from customscripts.local.status import Samples, function_ops_urls, probe, scrape, total
from customscripts.marketdata.replayer import replay
from tests.integration.realtime_support import delete_stream, drop_subscriptions, env_for, isolated, subscribe
from tests.integration.registry_support import Caller
from tests.integration.test_execute_e2e import AS_OF
from tests.integration.test_realtime import GOOG_START
from tests.waiting import wait_until

# reads 200 bars through gateway-fn; raises when asked to (an `error` execute)
SCRIPT = """
def run(ctx):
    if ctx.params.get("fail"):
        raise ValueError("asked to fail")
    return float(get_market_data(limit=200).close[-1])
"""
SECRET_PARAM = "p4ram-only-this-caller-knows"


@pytest.fixture
def alice(api, uid, stack):
    caller = Caller(api, f"alice-{uid}", f"tenant-{uid}")
    yield caller
    drop_subscriptions(stack, caller.tenant)


def _execute(caller: Caller, script_id: str, **params) -> dict:
    resp = caller.call("POST", f"/scripts/{script_id}/execute", {"instrument_key": "GOOG", "timeframe": "1d",
                                                                 "timestamp": AS_OF, "params": params})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _ok(caller: Caller, script_id: str) -> None:
    out = _execute(caller, script_id)
    assert out["status"] == "ok", out


def _ops(cfg, name: str) -> str:
    """The ops listener of a running function, as the provider names it (bounded wait for a cold start)."""
    found: dict[str, str | None] = {}

    def named() -> bool:
        found.update(function_ops_urls(cfg))
        return bool(found.get(name))

    assert wait_until(named, timeout=30, interval=0.1), f"{name} has no ops listener: {found}"
    return str(found[name])


def _moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_time_execute_moves_every_components_metrics(alice, uid, stack):
    sid = alice.sid(f"metrics-{uid}")
    alice.create_published(sid, SCRIPT)
    fn = function_name(sid, 1)
    _ok(alice, sid)  # deploys and warms the function
    ops = {name: _ops(stack, name) for name in ("registry-fn", "gateway-fn", fn)}
    ops["provider"] = stack.provider_url
    before = {name: scrape(url) for name, url in ops.items()}

    _ok(alice, sid)
    assert _execute(alice, sid, fail=1)["status"] == "error"
    after = {name: scrape(url) for name, url in ops.items()}

    registry = (before["registry-fn"], after["registry-fn"])
    assert _moved(*registry, "cs_executions_total", status="ok", tier="pro") == 1
    assert _moved(*registry, "cs_executions_total", status="error", tier="pro") == 1
    assert _moved(*registry, "cs_execution_duration_seconds_count", status="ok", tier="pro") == 1
    assert _moved(*registry, "cs_execution_duration_seconds_sum", status="ok", tier="pro") > 0
    assert _moved(*registry, "cs_execution_cpu_seconds_count", tier="pro") == 2
    assert _moved(*registry, "cs_execution_memory_bytes_count", tier="pro") == 2
    assert _moved(*registry, "cs_execution_memory_bytes_sum", tier="pro") > 0
    assert _moved(*registry, "cs_http_requests_total", component="registry-fn",
                  route="/scripts/{script_id}/execute", code="200") == 2

    function = (before[fn], after[fn])
    assert _moved(*function, "cs_function_executions_total", status="ok", kind="execute") == 1
    assert _moved(*function, "cs_function_executions_total", status="error", kind="execute") == 1
    assert _moved(*function, "cs_function_cpu_seconds_count") == 2
    assert _moved(*function, "cs_function_memory_bytes_sum") > 0
    assert _moved(*function, "cs_function_requests_total", kind="invocation", code="200") == 2

    gateway = (before["gateway-fn"], after["gateway-fn"])
    assert _moved(*gateway, "cs_http_requests_total", component="gateway-fn", route="/data/market", code="200") >= 1
    assert _moved(*gateway, "cs_http_request_duration_seconds_count", component="gateway-fn",
                  route="/data/market") >= 1

    provider = (before["provider"], after["provider"])
    assert _moved(*provider, "cs_provider_invocations_total", kind="sync", code="200") >= 2
    assert total(after["provider"], "cs_provider_functions_deployed", kind="script") >= 1
    assert total(after["provider"], "cs_provider_functions_deployed", kind="platform") == 2
    assert total(after["provider"], "cs_provider_cold_starts_total") >= 1
    for name, samples in after.items():  # each process says what it is
        component = "script-function" if name == fn else name
        assert total(samples, "cs_component_up", component=component) == 1, name


def test_health_routes_answer_on_every_component(alice, uid, stack):
    sid = alice.sid(f"health-{uid}")
    alice.create_published(sid, SCRIPT)
    _execute(alice, sid)
    for name, component in (("registry-fn", "registry-fn"), ("gateway-fn", "gateway-fn"),
                            (function_name(sid, 1), "script-function")):
        url = _ops(stack, name)
        assert probe(url, "/healthz") == (200, {"status": "ok", "component": component})
        status, body = probe(url, "/readyz")
        assert status == 200 and body["status"] == "ok" and set(body["checks"].values()) == {"ok"}, body
    status, body = probe(stack.provider_url, "/readyz")
    assert status == 200 and body["component"] == "provider", body
    checks = {"registry-fn": {"postgres", "redis"}, "gateway-fn": {"postgres-reader", "redis"},
              function_name(sid, 1): {"sandbox", "gateway-fn"}}
    for name, wanted in checks.items():
        assert set(probe(_ops(stack, name), "/readyz")[1]["checks"]) == wanted


def test_no_metrics_through_the_gateway_and_no_caller_data_in_labels(alice, uid, stack):
    """A caller reaches functions only through /function/<name>/...: no path there serves metrics, and what
    the ops listeners serve carries no user, tenant, script, params or source in any label."""
    sid = alice.sid(f"leak-{uid}")
    alice.create_published(sid, SCRIPT)
    fn = function_name(sid, 1)
    _execute(alice, sid, secret=SECRET_PARAM)
    headers = {"Authorization": f"Bearer {alice.token}"}
    for name in ("registry-fn", "gateway-fn", fn):
        for path in ("/metrics", "/metrics/", "/readyz", "/healthz?x=1", "//metrics", "/./metrics", "/%6detrics"):
            resp = requests.get(f"{stack.provider_url}/function/{name}{path}", headers=headers, timeout=30)
            assert "cs_component_up" not in resp.text and "# TYPE" not in resp.text, (name, path, resp.text[:200])
            assert resp.status_code != 200 or path.startswith("/healthz"), (name, path, resp.status_code)
    forbidden = {uid, alice.user_id, alice.tenant, sid, fn, SECRET_PARAM, "get_market_data", "asked to fail"}
    for name, url in {**{n: _ops(stack, n) for n in ("registry-fn", "gateway-fn", fn)},
                      "provider": stack.provider_url}.items():
        for (metric, labels), _value in scrape(url).items():
            for key, value in labels:
                assert not any(bad in value for bad in forbidden), (name, metric, key, value)
                if metric.startswith("cs_"):
                    assert key in ("component", "status", "tier", "kind", "code", "route", "reason", "source",
                                   "le"), (name, metric, key)


def test_realtime_event_moves_the_schedulers_metrics(alice, uid, stack):
    rt = isolated(stack, uid)
    sid = alice.sid(f"rt-{uid}")
    alice.create_published(sid, SCRIPT)
    assert subscribe(alice, sid).status_code == 201
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "customscripts.realtime.scheduler", "--metrics-port", str(port)],
                            env=env_for(rt), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: probe(url, "/healthz")[0] == 200, timeout=30, interval=0.1)
        assert wait_until(lambda: probe(url, "/readyz")[0] == 200, timeout=30, interval=0.1), probe(url, "/readyz")
        assert set(probe(url, "/readyz")[1]["checks"]) == {"postgres", "redis", "nats"}
        before = scrape(url)
        published = replay("GOOG", "1d", start=GOOG_START, limit=3, cfg=rt).published
        assert published == 3

        def evaluated() -> bool:
            return _moved(before, scrape(url), "cs_realtime_evaluations_total", status="ok") >= 3

        assert wait_until(evaluated, timeout=60, interval=0.2)
        after = scrape(url)
        assert _moved(before, after, "cs_realtime_event_to_published_seconds_count") >= 3
        assert _moved(before, after, "cs_realtime_invoke_seconds_count") >= 1
        assert total(after, "cs_component_up", component="scheduler") == 1
        # the consumer's backlog, sampled from NATS at the scrape: everything delivered and acknowledged
        def drained() -> bool:
            now = scrape(url)
            return now.get((metrics.CONSUMER_PENDING, ())) == 0 and now.get((metrics.CONSUMER_ACK_PENDING, ())) == 0

        assert wait_until(drained, timeout=30, interval=0.5)
        fn_samples = scrape(_ops(stack, function_name(sid, 1)))
        assert total(fn_samples, "cs_function_executions_total", status="ok", kind="batch") >= 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)  # every event is acknowledged; a replica's drain can take longer (issue 13, item 4)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        delete_stream(rt)


def test_readiness_fails_when_the_database_is_unreachable(stack):
    """A second registry-fn process (its real build context and handler) pointed at closed ports: alive,
    not ready, and readiness names PostgreSQL and Redis. The shared stack is not touched."""
    closed = [_free_port(), _free_port()]
    folder = Path(stack.functions_dir) / "registry-fn"
    assert (folder / "index.py").is_file()
    rfd, wfd = os.pipe()
    env = {**os.environ, "CS_PG_PORT": str(closed[0]), "CS_REDIS_PORT": str(closed[1]), "CS_FN_READY_FD": str(wfd),
           "CS_FN_PORT": "0", "CS_FN_METRICS_PORT": "0", "CS_FN_METRICS_ADDR": "127.0.0.1",
           "CS_BUILD_WORKER": "off", "CS_FUNCTION_NAME": "registry-fn"}
    proc = subprocess.Popen([sys.executable, "index.py"], cwd=folder, env=env, pass_fds=(wfd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(wfd)
    try:
        line = b""
        with os.fdopen(rfd, "rb") as ready:
            while not line.endswith(b"\n"):
                chunk = ready.read(1)
                assert chunk, "the second registry-fn did not start"
                line += chunk
        _port, ops_port = (int(p) for p in line.split())
        url = f"http://127.0.0.1:{ops_port}"
        assert probe(url, "/healthz")[0] == 200
        status, body = probe(url, "/readyz")
        assert status == 503 and body["status"] == "unavailable", body
        assert body["checks"]["postgres"] != "ok" and body["checks"]["redis"] != "ok", body
        assert total(scrape(url), "cs_component_ready", component="registry-fn") == 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_status_prints_health_and_the_key_figures(alice, uid, stack):
    sid = alice.sid(f"status-{uid}")
    alice.create_published(sid, SCRIPT)
    _execute(alice, sid)
    result = subprocess.run([sys.executable, "-m", "customscripts.cli", "status"], capture_output=True, text=True,
                            timeout=120)
    # (exit 1 would only mean some component of another test is not ready: what is checked is the report)
    assert result.returncode in (0, 1) and not result.stderr.strip(), result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("provider", "gateway-fn", function_name(sid, 1)):
        assert any(line.split()[:2] == [name, "ready"] for line in lines), (name, result.stdout)
    figures = dict(line.strip().split(": ", 1) for line in lines if line.startswith("  ") and ": " in line)
    assert "ok" in figures["executes by status"], result.stdout
    assert "script" in figures["deployed functions"] and "platform" in figures["deployed functions"]
    for key in ("dead letters", "gateway reads", "cold starts"):
        assert key in figures


def test_status_says_clearly_when_a_component_is_down(stack):
    """The report of a stack whose provider does not answer (its port closed; the shared stack untouched)."""
    import dataclasses

    from customscripts.local import status

    report = status.report(dataclasses.replace(stack, provider_port=_free_port()))
    assert report["services"]["provider"]["healthy"] is False
    assert report["components"]["provider"]["state"] == "down"
    text = status.render(report)
    assert "provider" in text and "DOWN" in text and "does not answer" in text
    assert not status.healthy(report)


def test_gateway_rate_limit_refusals_are_counted(stack, uid):
    """Reads over the smallest tier's burst at the real gateway-fn: the refusals show as 429s of their route and
    in cs_gateway_rate_limited_total (by source, never by caller)."""
    from customscripts.gateway.tokens import mint_execution_token

    tier = min(stack.tiers.values(), key=lambda t: t.burst)
    token = mint_execution_token(user=f"u-{uid}", tenant=f"t-{uid}", script_id=f"s-{uid}", version=1, deps=[],
                                 as_of=AS_OF, tier=tier.name)
    ops = _ops(stack, "gateway-fn")
    before = scrape(ops)
    statuses = [requests.get(f"{stack.data_gateway_url}/data/market", params={"instrument_key": "GOOG",
                                                                             "timeframe": "1d", "limit": 5},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code
                for _ in range(tier.burst + 5)]
    assert 429 in statuses and 200 in statuses, statuses
    after = scrape(ops)
    refused = statuses.count(429)
    assert _moved(before, after, "cs_gateway_rate_limited_total", source="onetime") >= 1
    assert _moved(before, after, "cs_http_requests_total", component="gateway-fn", route="/data/market",
                  code="429") == refused
