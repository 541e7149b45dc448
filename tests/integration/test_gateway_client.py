"""GatewayClient against the real gateway over HTTP: retries transient failures, then fails clearly."""

from __future__ import annotations

import dataclasses
import time
from array import array

import pytest

from customscripts.gateway.api import GatewayApi
from customscripts.gateway.client import GatewayClient
from customscripts.gateway.tokens import mint_execution_token
from customscripts.http import LocalServer, json_response
from customscripts.marketdata.loader import load_sample_data
from customscripts.retry import RetryPolicy
from customscripts.sandbox.datasource import (
    ColumnFrames,
    DataAccessError,
    DataDenied,
    DataSource,
    DataSourceUnavailable,
    DeadlineExceeded,
    DependencyUnavailable,
    read_deadline,
)
from customscripts.sandbox.protocol import split_binary


class Counting:
    """The real gateway handler, counting requests, optionally answering the first few with a fault."""

    def __init__(self, api: GatewayApi, faults: list[dict] | None = None) -> None:
        self.api, self.faults, self.calls = api, list(faults or []), 0

    def __call__(self, event, context):
        self.calls += 1
        if self.faults:
            return self.faults.pop(0)
        return self.api.handle(event, context)


@pytest.fixture(scope="module")
def api(stack):
    load_sample_data(stack, echo=lambda _msg: None)
    return GatewayApi(stack)


@pytest.fixture
def token(uid):
    return mint_execution_token(user=f"u-{uid}", tenant=f"t-{uid}", script_id=f"s-{uid}", version=1,
                                deps=[f"dep-{uid}@1"], as_of=time.time(), tier="enterprise")


def stop_like_a_crash(server: LocalServer) -> None:
    """Stop listening AND drop open keep-alive connections, as a dying process would."""
    server.server.drop_connections()
    server.stop()


def _client(url: str, token: str, sleeps: list[float], **kw) -> GatewayClient:
    return GatewayClient(url, token, sleep=sleeps.append, **kw)


def test_client_satisfies_the_sandbox_datasource_protocol(token):
    assert isinstance(GatewayClient("http://127.0.0.1:9", token), DataSource)


def test_reads_market_data_metrics_and_missing_outputs(api, token, uid):
    server = LocalServer(Counting(api)).start()
    try:
        with GatewayClient(server.url, token) as client:
            bars = client.get_market_data("GOOG", "1d", limit=200)
            assert len(bars["columns"]["close"]) == 200 and bars["columns"]["time"][-1] == 1362096000.0
            metric = client.get_metric("GOOG", "derived.return_1", limit=5)
            assert len(metric["columns"]["value"]) == 5
            with pytest.raises(DependencyUnavailable) as err:
                client.get_script_output(f"dep-{uid}", "GOOG", "1d")
            assert err.value.script_id == f"dep-{uid}"
            with pytest.raises(DataDenied):
                client.get_script_output(f"stranger-{uid}", "GOOG", "1d")
            with pytest.raises(ValueError, match="invalid_timeframe"):
                client.get_market_data("GOOG", "daily")
    finally:
        server.stop()


class IgnoringAccept(Counting):
    """A gateway that answers JSON whatever the caller asks for."""

    def __call__(self, event, context):
        headers = {k: v for k, v in dict(event.headers).items() if k.lower() != "accept"}
        return super().__call__(dataclasses.replace(event, headers=headers), context)


def _decoded(payload: bytes) -> dict:
    head, blob = split_binary(bytearray(payload))
    columns, offset = {}, 0
    for name, n in head.pop("f64"):
        columns[name] = array("d", bytes(blob[offset:offset + 8 * n])).tolist()
        offset += 8 * n
    return {**head, "columns": columns}


@pytest.mark.parametrize("gateway", [Counting, IgnoringAccept])
def test_columns_reads_equal_the_json_reads(api, token, gateway):
    """market_columns/metric_columns carry the JSON read's numbers, also from a gateway that only
    speaks JSON; their errors are the same as the JSON reads'."""
    server = LocalServer(gateway(api)).start()
    try:
        client = GatewayClient(server.url, token)
        assert isinstance(client, ColumnFrames)
        for args in ({"limit": 200}, {"limit": 3, "end": 1356998400.0}, {"start": 1356998400.0, "limit": 2}):
            assert _decoded(client.market_columns("GOOG", "1d", **args)) == client.get_market_data("GOOG", "1d", **args)
        assert (_decoded(client.metric_columns("GOOG", "derived.return_1", limit=5))
                == client.get_metric("GOOG", "derived.return_1", limit=5))
        with pytest.raises(ValueError, match="invalid_timeframe"):
            client.market_columns("GOOG", "daily")
    finally:
        server.stop()


def test_transient_failures_are_retried_then_succeed(api, token):
    unavailable = json_response({"error": {"code": "unavailable", "message": "restarting"}}, 503)
    limited = json_response({"error": {"code": "rate_limited", "message": "slow down"}}, 429,
                            {"Retry-After": "30"})
    handler = Counting(api, faults=[unavailable, limited])
    server = LocalServer(handler).start()
    sleeps: list[float] = []
    try:
        client = _client(server.url, token, sleeps, retry_after_cap_s=0.25)
        bars = client.get_market_data("GOOG", "1d", limit=10)
        assert len(bars["columns"]["time"]) == 10
        assert handler.calls == 3 and client.retries == 2
        assert 0 < sleeps[0] <= client.retry.backoff_s and sleeps[1] == 0.25  # backoff, then Retry-After capped
    finally:
        server.stop()


def test_gateway_stopped_mid_run_is_retried_then_reported_clearly(api, token):
    handler = Counting(api)
    server = LocalServer(handler).start()
    sleeps: list[float] = []
    client = _client(server.url, token, sleeps, retry=RetryPolicy(attempts=4, backoff_s=0.01))
    assert len(client.get_market_data("GOOG", "1d", limit=5)["columns"]["time"]) == 5  # the run starts fine
    stop_like_a_crash(server)  # ... then the gateway goes away
    before = client.requests_sent
    with pytest.raises(DataSourceUnavailable) as err:  # typed: the supervisor marks the result retryable
        client.get_market_data("GOOG", "1d", limit=5)
    message = str(err.value)
    assert server.url in message and "get_market_data('GOOG', '1d')" in message and "4 attempts" in message
    assert client.requests_sent - before == 4 and len(sleeps) == 3
    assert all(0.01 * 2**i / 2 <= s <= 0.01 * 2**i for i, s in enumerate(sleeps))  # exponential + jitter
    assert handler.calls == 1  # nothing reached the stopped server


def test_gateway_answering_503_forever_fails_after_bounded_attempts(api, token):
    fault = json_response({"error": {"code": "unavailable", "message": "down"}}, 503)
    handler = Counting(api, faults=[fault] * 10)
    server = LocalServer(handler).start()
    sleeps: list[float] = []
    try:
        client = _client(server.url, token, sleeps, retry=RetryPolicy(attempts=3))
        with pytest.raises(DataSourceUnavailable, match="503 unavailable: down"):
            client.get_metric("GOOG", "derived.return_1")
        assert handler.calls == 3 and len(sleeps) == 2
    finally:
        server.stop()


def test_own_rate_limit_exhausted_is_not_an_outage(api, token):
    """Refused for the caller's own rate limit until the retries ran out: the script's quota, so the
    error is not the retryable DataSourceUnavailable (a realtime batch would otherwise retry it)."""
    limited = json_response({"error": {"code": "rate_limited", "message": "slow down"}}, 429, {"Retry-After": "1"})
    handler = Counting(api, faults=[limited] * 10)
    server = LocalServer(handler).start()
    try:
        client = _client(server.url, token, [], retry=RetryPolicy(attempts=3), retry_after_cap_s=0.0)
        with pytest.raises(DataAccessError, match="rate_limited") as err:
            client.get_market_data("GOOG", "1d")
        assert not isinstance(err.value, DataSourceUnavailable)
    finally:
        server.stop()


def test_server_errors_are_not_retried(api, token):
    bug = json_response({"error": {"code": "internal_error", "message": "bug"}}, 500)
    handler = Counting(api, faults=[bug])
    server = LocalServer(handler).start()
    try:
        client = _client(server.url, token, [])
        with pytest.raises(DataAccessError, match="internal_error"):
            client.get_market_data("GOOG", "1d")
        assert handler.calls == 1
    finally:
        server.stop()


def test_an_outage_that_outlasts_the_executions_time_is_still_an_outage(api, token):
    """503 until the execution's time runs out: the retryable DataSourceUnavailable (the gateway said
    it could not serve), not the execution's own timeout."""
    fault = json_response({"error": {"code": "store_unavailable", "message": "down"}}, 503, {"Retry-After": "1"})
    server = LocalServer(Counting(api, faults=[fault] * 10)).start()
    try:
        client = GatewayClient(server.url, token, retry=RetryPolicy(attempts=10, backoff_s=0.01))
        token_ = read_deadline.set(time.monotonic() + 0.5)
        try:
            with pytest.raises(DataSourceUnavailable, match="time ran out"):
                client.get_market_data("GOOG", "1d")
        finally:
            read_deadline.reset(token_)
    finally:
        server.stop()


def test_a_read_that_takes_the_executions_time_is_its_timeout(api, token):
    """A slow answer is not an outage a script could hide behind: the execution's own timeout."""

    def slow(event, context=None):
        time.sleep(1.0)
        return api.handle(event, context)

    server = LocalServer(slow).start()
    try:
        client = GatewayClient(server.url, token)
        token_ = read_deadline.set(time.monotonic() + 0.3)
        try:
            with pytest.raises(DeadlineExceeded):
                client.get_market_data("GOOG", "1d")
        finally:
            read_deadline.reset(token_)
    finally:
        server.stop()
