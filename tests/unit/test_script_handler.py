"""The script function (customscripts/faas/script_function.py, served by templates/script/handler.py):
sandbox started at import, invocation tokens, one GatewayClient per execution token over one shared
connection pool, settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest

from customscripts.faas.naming import function_name
from customscripts.gateway.client import GatewayClient
from customscripts.sandbox.invocation import mint_invocation_token
from customscripts.sandbox.sampledata import SampleDataSource
from tests.script_function import configure as set_settings
from tests.script_function import script_handler

TS = 1362096000.0
SCRIPT = "import numpy as np\n\ndef run(ctx):\n    return float(np.mean(get_market_data(limit=200).close[-20:]))\n"


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    meta = {"script_id": "handler-test", "version": 3, "tier": "pro", "output_schema": {"type": "number"},
            "limits": {"timeout_ms": None, "memory_mb": None, "cpu_seconds": None}}
    with script_handler(tmp_path_factory.mktemp("fn"), "cs-handler-test-v3", SCRIPT, meta) as module:
        yield module


def configure(monkeypatch: pytest.MonkeyPatch, handler: ModuleType, **changes: object) -> None:
    set_settings(monkeypatch, **changes)


def event(body: object, fn: str = "cs-handler-test-v3", token: str | None = None) -> SimpleNamespace:
    token = token if token is not None else mint_invocation_token(fn, {"user": "u1"}, 60)
    return SimpleNamespace(body=json.dumps(body).encode(), headers={"Authorization": f"Bearer {token}"},
                           method="POST", path="/", query={})


def test_sandbox_is_started_at_import(handler: ModuleType) -> None:
    assert handler.function.supervisor is not None
    assert handler.function.supervisor.zygote_info.get("preloaded")


def test_execution_with_sample_data(handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, handler, function_name="cs-handler-test-v3", function_sample_data=True)
    out = handler.handle(event({"instrument_key": "GOOG", "timeframe": "1d", "timestamp": TS}), None)
    assert out["statusCode"] == 200, out
    body = json.loads(out["body"])
    closes = SampleDataSource().get_market_data("GOOG", "1d", limit=20, end=TS)["columns"]["close"]
    assert body["status"] == "ok" and body["output"]["value"] == pytest.approx(sum(closes) / 20)


def test_execution_token_required_without_sample_data(handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, handler, function_name="cs-handler-test-v3", function_sample_data=False)
    out = handler.handle(event({"instrument_key": "GOOG", "timeframe": "1d", "timestamp": TS}), None)
    assert out["statusCode"] == 400 and "missing_execution_token" in out["body"]


def test_batch_limit_comes_from_settings(handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, handler, function_name="cs-handler-test-v3", function_sample_data=True,
              sandbox_max_batch=2)
    item = {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": TS}
    assert handler.handle(event({"items": [item] * 3}), None)["statusCode"] == 400
    ok = handler.handle(event({"items": [item] * 2}), None)
    assert ok["statusCode"] == 200 and [r["status"] for r in json.loads(ok["body"])["results"]] == ["ok", "ok"]


def test_invocation_token_for_another_function_is_rejected(handler: ModuleType,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, handler, function_name="cs-handler-test-v3", function_sample_data=True)
    out = handler.handle(event({}, fn="cs-other-v1"), None)
    assert out["statusCode"] == 401


def test_function_name_falls_back_to_the_versions_name(handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, handler, function_name="")
    assert handler.function.name == function_name("handler-test", 3)
    configure(monkeypatch, handler, function_name="from-env")
    assert handler.function.name == "from-env"


def test_one_gateway_client_per_token_over_one_connection_pool(handler: ModuleType,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, handler, gateway_url="http://gateway.test:9")
    clients: dict[str, GatewayClient] = {}
    a = handler.function._data_source("token-a", clients)
    b = handler.function._data_source("token-b", clients)
    assert handler.function._data_source("token-a", clients) is a and a is not b
    assert isinstance(a, GatewayClient) and a.base_url == "http://gateway.test:9"
    # each client sends its own token with every call; the keep-alive pool is shared
    assert a._auth == {"Authorization": "Bearer token-a"} and b._auth == {"Authorization": "Bearer token-b"}
    assert a._pool is not None and a._pool is b._pool and a.session is None
    other = handler.function._data_source("token-a", {})  # a later request gets a new client, same pool
    assert other is not a and other._pool is a._pool
