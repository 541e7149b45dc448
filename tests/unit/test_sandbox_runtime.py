"""Runtime behaviour of the sandbox: output normalisation and validation, logs, tracebacks, data
errors, batches and timeouts. Uses the real sandbox (bwrap) unless a test says otherwise."""

from __future__ import annotations

import pytest

from customscripts.errors import Unauthenticated
from customscripts.sandbox import (
    ExecutionRequest,
    IsolationUnavailable,
    SampleDataSource,
    SandboxLimits,
    Supervisor,
    protocol,
)
from customscripts.sandbox.invocation import mint_invocation_token, verify_invocation_token
from customscripts.sandbox.results import InvalidOutput, normalise_output

TS = 1362096000.0


def sup(src: str, *, schema: dict | None = None, isolation: str = "bwrap", **lim: object) -> Supervisor:
    limits = SandboxLimits.default(**{"timeout_ms": 500, **lim})  # type: ignore[arg-type]
    return Supervisor(src, output_schema=schema, limits=limits, isolation=isolation,
                      data=SampleDataSource(), prefork=1)


def req(**params: object) -> ExecutionRequest:
    return ExecutionRequest("GOOG", "1d", dict(params), TS)


@pytest.mark.parametrize(("raw", "expected"), [
    (1.5, {"value": 1.5, "timestamp": TS, "metadata": {}}),
    ({"a": 1, "b": 2.0}, {"value": {"a": 1, "b": 2.0}, "timestamp": TS, "metadata": {}}),
    ({"value": 3, "metadata": {"n": 1}}, {"value": 3, "timestamp": TS, "metadata": {"n": 1}}),
])
def test_normalise_output(raw: object, expected: dict) -> None:
    assert normalise_output(raw, TS) == expected


@pytest.mark.parametrize("raw", [None, "x", [1, 2], {"a": "x"}, True, {"value": 1, "junk": 2}, float("nan")])
def test_normalise_rejects(raw: object) -> None:
    with pytest.raises(InvalidOutput):
        normalise_output(raw, TS)


def test_sma_ok_with_numpy_and_globals() -> None:
    src = """
import numpy as np
def run(ctx):
    bars = get_market_data(limit=200)
    assert len(bars) == 200 and bars["close"] is bars.close
    return {"value": float(np.mean(bars.close[-ctx.params['period']:])), "metadata": {"n": len(bars)}}
"""
    with sup(src) as s:
        r = s.execute(req(period=20))
    assert r.status == "ok", r.to_dict()
    assert r.output and r.output["timestamp"] == TS and r.output["metadata"] == {"n": 200}
    assert r.cpu_ms > 0 and r.memory_mb > 0 and r.duration_ms > 0


def test_schema_violation_is_invalid_output() -> None:
    schema = {"type": "number", "minimum": 0}
    with sup("def run(ctx):\n    return -1\n", schema=schema) as s:
        r = s.execute(req())
    assert r.status == "invalid_output" and "output_schema" in r.error["message"]


def test_envelope_schema_validates_whole_output() -> None:
    schema = {"type": "object", "properties": {"value": {"type": "number"},
                                               "metadata": {"required": ["why"]}}}
    with sup("def run(ctx):\n    return {'value': 1, 'metadata': {}}\n", schema=schema) as s:
        assert s.execute(req()).status == "invalid_output"


@pytest.mark.parametrize("expr", ["float('nan')", "float('inf')", "{'a': float('-inf')}",
                                  "{'value': 1, 'metadata': {'x': float('nan')}}"])
def test_nan_rejected(expr: str) -> None:
    with sup(f"def run(ctx):\n    return {expr}\n") as s:
        r = s.execute(req())
    assert r.status == "invalid_output", r.to_dict()


def test_non_json_type_rejected() -> None:
    with sup("def run(ctx):\n    return {'value': 1, 'metadata': {'s': {1, 2}}}\n") as s:
        r = s.execute(req())
    assert r.status == "invalid_output" and "set" in r.error["message"]


def test_oversized_output_rejected() -> None:
    src = "def run(ctx):\n    return {'value': 1, 'metadata': {'blob': 'x' * 200000}}\n"
    with sup(src, max_output_bytes=4096) as s:
        r = s.execute(req())
    assert r.status == "invalid_output" and "exceeds" in r.error["message"]


def test_stdout_capture_is_bounded() -> None:
    src = "def run(ctx):\n    print('start')\n    print('y' * 100000)\n    import math\n    return 1\n"
    with sup(src, max_log_bytes=1000) as s:
        r = s.execute(req())
    assert r.status == "ok"
    assert r.stdout.startswith("start") and len(r.stdout) < 1100 and "truncated" in r.stdout


def test_traceback_trimmed_to_user_frames() -> None:
    src = "def helper(x):\n    return 1 / x\n\ndef run(ctx):\n    return helper(0)\n"
    with sup(src) as s:
        r = s.execute(req())
    assert r.status == "error" and r.error["type"] == "ZeroDivisionError"
    tb = r.error["traceback"]
    assert 'File "script.py", line 5, in run' in tb and 'File "script.py", line 2, in helper' in tb
    assert "runtime.py" not in tb and "zygote" not in tb


def test_syntax_error_has_line_number() -> None:
    with sup("def run(ctx):\n    return (\n") as s:
        r = s.execute(req())
    assert r.status == "error" and r.error["type"] == "SyntaxError" and "line" in r.error["traceback"]


def test_dependency_failed_names_dependency() -> None:
    src = "def run(ctx):\n    return get_script_output('base-rsi')['value']\n"
    with sup(src) as s:
        r = s.execute(req())
    assert r.status == "dependency_failed", r.to_dict()
    assert r.error["dependency"] == "base-rsi" and "base-rsi" in r.error["message"]


def test_dependency_output_available() -> None:
    data = SampleDataSource()
    data.register_output("base-rsi", "GOOG", "1d", 55.0, TS - 10)
    src = "def run(ctx):\n    return get_script_output('base-rsi')['value'] * 2\n"
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=data, prefork=1) as s:
        r = s.execute(req())
    assert r.status == "ok" and r.output["value"] == 110.0


def test_denied_read() -> None:
    src = "def run(ctx):\n    return len(get_market_data('GOOG'))\n"
    data = SampleDataSource(denied_instruments=frozenset({"GOOG"}))
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=data, prefork=1) as s:
        r = s.execute(req())
    assert r.status == "denied", r.to_dict()


def test_data_error_is_clear() -> None:
    with sup("def run(ctx):\n    return len(get_market_data('NOPE'))\n") as s:
        r = s.execute(req())
    assert r.status == "error" and r.error["type"] == "DataAccessError" and "NOPE" in r.error["message"]


def test_batch_returns_one_result_per_item() -> None:
    src = """
def run(ctx):
    p = ctx.params['p']
    if p == 3:
        raise ValueError('bad p')
    if p == 5:
        while True:
            pass
    return p * 10
"""
    with sup(src, timeout_ms=300) as s:
        rs = s.execute_batch([req(p=i) for i in range(8)])
    assert [r.status for r in rs] == ["ok", "ok", "ok", "error", "ok", "timeout", "ok", "ok"]
    assert [r.output["value"] for r in rs if r.ok] == [0, 10, 20, 40, 60, 70]


def test_timeout_then_next_execution_succeeds() -> None:
    src = "def run(ctx):\n    while ctx.params.get('spin'):\n        pass\n    return 7\n"
    with sup(src, timeout_ms=200) as s:
        first = s.execute(req(spin=True))
        second = s.execute(req())
    assert first.status == "timeout" and 150 <= first.duration_ms < 2000
    assert second.status == "ok" and second.output["value"] == 7


def test_as_of_is_enforced_by_sample_source() -> None:
    data = SampleDataSource()
    ts = TS - 30 * 86400
    d = data.get_market_data("GOOG", "1d", limit=10, end=ts)
    assert max(d["columns"]["time"]) <= ts and len(d["columns"]["close"]) == 10
    m = data.get_metric("GOOG", "realized_vol_20", limit=5, end=ts)
    assert max(m["columns"]["time"]) <= ts and len(m["columns"]["value"]) == 5
    assert data.get_market_data("EURUSD", "1h", limit=3)["timeframe"] == "1h"
    assert len(data.get_market_data("BTCUSD", "1mo")["columns"]["close"]) > 100


def test_process_mode_runs_with_seccomp() -> None:
    src = """
import math
def run(ctx):
    return math.sqrt(get_metric('volume_z_20', limit=5).value[-1] ** 2)
"""
    with sup(src, isolation="process") as s:
        r = s.execute(req())
    assert r.status == "ok", r.to_dict()


def test_unknown_isolation_mode() -> None:
    with pytest.raises(ValueError):
        sup("def run(ctx):\n    return 1\n", isolation="none")


def test_missing_bwrap_raises_isolation_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(IsolationUnavailable) as err:
        sup("def run(ctx):\n    return 1\n")
    assert err.value.layer == "bubblewrap"


def test_invocation_token_roundtrip_and_failures() -> None:
    tok = mint_invocation_token("fn-a", {"user": "u1"}, 30, secret="s")
    assert verify_invocation_token(tok, "fn-a", secret="s")["user"] == "u1"
    with pytest.raises(Unauthenticated):
        verify_invocation_token(tok, "fn-b", secret="s")
    with pytest.raises(Unauthenticated):
        verify_invocation_token(tok, "fn-a", secret="other")
    with pytest.raises(Unauthenticated):
        verify_invocation_token(tok[:-2] + "xx", "fn-a", secret="s")
    old = mint_invocation_token("fn-a", {}, 10, secret="s", now=1000)
    with pytest.raises(Unauthenticated):
        verify_invocation_token(old, "fn-a", secret="s")
    with pytest.raises(Unauthenticated):
        verify_invocation_token("garbage", "fn-a", secret="s")


def test_numpy_lazy_internal_imports_work_under_guards() -> None:
    src = """
import numpy as np
def run(ctx):
    d = np.diff(get_market_data(limit=70).close)
    return float(d.clip(min=0).mean() + np.std(d) + np.percentile(d, 90))
"""
    with sup(src) as s:
        r = s.execute(req())
    assert r.status == "ok", r.to_dict()


class CountingSource(SampleDataSource):
    """Sample data that counts the reads the supervisor makes (and can hand out odd columns)."""

    def __init__(self, columns: dict | None = None) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.columns = columns

    def get_market_data(self, instrument_key: str, timeframe: str, **kw: object) -> dict:
        self.calls.append(("market", instrument_key, kw.get("limit"), kw.get("end")))
        if self.columns is not None:
            return {"instrument_key": instrument_key, "timeframe": timeframe, "columns": self.columns}
        return super().get_market_data(instrument_key, timeframe, **kw)  # type: ignore[arg-type]


def test_market_columns_are_writable_float64_arrays_with_the_sources_values() -> None:
    src = """
import numpy as np
def run(ctx):
    bars = get_market_data(limit=200)
    close = bars.close
    ok = close.dtype == np.float64 and close.flags.writeable and bars["time"].shape == (200,)
    close[-1] = close[-1] + 1.0
    return {"value": float(close.sum()), "metadata": {"ok": bool(ok), "keys": bars.keys()}}
"""
    data = SampleDataSource()
    want = data.get_market_data("GOOG", "1d", limit=200, end=TS)
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=data, prefork=1) as s:
        r = s.execute(req())
    assert r.status == "ok", r.to_dict()
    assert r.output["metadata"] == {"ok": True, "keys": list(want["columns"])}
    assert r.output["value"] == pytest.approx(sum(want["columns"]["close"]) + 1.0)


def test_missing_values_in_a_numeric_column_arrive_as_nan() -> None:
    src = """
import numpy as np
def run(ctx):
    c = get_market_data().close
    return {"value": float(np.nansum(c)), "metadata": {"nan": [bool(x) for x in np.isnan(c)]}}
"""
    data = CountingSource({"time": [1.0, 2.0, 3.0], "close": [1.5, None, 2]})
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=data, prefork=1) as s:
        r = s.execute(req())
    assert r.status == "ok", r.to_dict()
    assert r.output["value"] == 3.5 and r.output["metadata"]["nan"] == [False, True, False]


class ColumnsSource(SampleDataSource):
    """Answers market and metric reads as columns payloads (`ColumnFrames`), as GatewayClient does;
    `mangle` corrupts them to show what a malformed payload does."""

    def __init__(self, mangle: bool = False) -> None:
        super().__init__()
        self.mangle = mangle
        self.frames = 0

    def _payload(self, reply: dict) -> bytes:
        self.frames += 1
        body = protocol.columns_payload({k: v for k, v in reply.items() if k != "columns"}, reply["columns"])
        assert body is not None
        return body[:-8] if self.mangle else body  # one float short of what the head announces

    def market_columns(self, instrument_key: str, timeframe: str, **kw: object) -> bytes:
        return self._payload(self.get_market_data(instrument_key, timeframe, **kw))  # type: ignore[arg-type]

    def metric_columns(self, instrument_key: str, name: str, **kw: object) -> bytes:
        return self._payload(self.get_metric(instrument_key, name, **kw))  # type: ignore[arg-type]


def test_a_columns_source_reaches_the_script_as_the_same_numpy_columns() -> None:
    src = """
def run(ctx):
    bars = get_market_data(limit=200)
    m = get_metric("return_1", limit=5)
    return {"value": float(bars.close.sum()), "metadata": {"n": len(bars), "m": [float(x) for x in m.value],
            "key": bars.instrument_key, "keys": bars.keys()}}
"""
    data = ColumnsSource()
    want = data.get_market_data("GOOG", "1d", limit=200, end=TS)
    metric = data.get_metric("GOOG", "return_1", limit=5, end=TS)
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=data, prefork=1) as s:
        r = s.execute(req())
    assert r.status == "ok", r.to_dict()
    assert data.frames == 2
    assert r.output["value"] == pytest.approx(sum(want["columns"]["close"]))
    assert r.output["metadata"] == {"n": 200, "m": metric["columns"]["value"], "key": "GOOG",
                                    "keys": list(want["columns"])}


def test_a_malformed_columns_payload_fails_the_read_clearly() -> None:
    src = "def run(ctx):\n    return float(get_market_data().close[-1])\n"
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=ColumnsSource(mangle=True),
                    prefork=1) as s:
        r = s.execute(req())
    assert r.status == "error"
    assert r.error["type"] == "DataAccessError" and "malformed columns reply" in r.error["message"]


def test_reads_are_cached_per_request_not_across_requests() -> None:
    src = """
def run(ctx):
    a = get_market_data(limit=50)
    b = get_market_data(limit=50)
    c = get_market_data(limit=60)
    return len(a) + len(b) + len(c)
"""
    data = CountingSource()
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=data, prefork=1) as s:
        assert s.execute(req()).output["value"] == 160
        assert [c[2] for c in data.calls] == [50, 60]
        assert s.execute(req()).ok
        assert len(data.calls) == 4
        rs = s.execute_batch([req(), req(), req()])  # one request: the items share the cache
        assert [r.output["value"] for r in rs] == [160, 160, 160]
        assert len(data.calls) == 6


def test_batches_larger_than_max_batch_are_split_across_children() -> None:
    src = ("SEEN = []\ndef run(ctx):\n    SEEN.append(1)\n"
           "    return {'value': ctx.params['i'], 'metadata': {'n': len(SEEN)}}\n")
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=SampleDataSource(), prefork=1,
                    max_batch=3) as s:
        rs = s.execute_batch([req(i=i) for i in range(7)])
    assert [r.output["value"] for r in rs] == list(range(7))
    assert [r.output["metadata"]["n"] for r in rs] == [1, 2, 3, 1, 2, 3, 1]  # a fresh child per 3 items


def test_max_calls_per_item() -> None:
    src = "def run(ctx):\n    for i in range(10):\n        get_market_data(limit=10 + i)\n    return 1\n"
    with Supervisor(src, limits=SandboxLimits.default(), isolation="bwrap", data=SampleDataSource(), prefork=1,
                    max_calls_per_item=5) as s:
        r = s.execute(req())
        assert r.status == "error" and "too many data calls" in r.error["message"], r.to_dict()
        assert s.execute(req()).status == "error"  # and it keeps serving


def test_usage_comes_from_the_kernel_for_the_request_only() -> None:
    src = """
def run(ctx):
    x = 0
    for i in range(ctx.params.get('n', 0)):
        x += i
    return 1
"""
    with sup(src, timeout_ms=2000) as s:
        idle = s.execute(req(n=0))
        busy = s.execute(req(n=3_000_000))
    for r in (idle, busy):
        assert r.ok and r.memory_mb > 1
        assert 0 < r.cpu_ms <= r.duration_ms + 5, r.to_dict()  # one thread: CPU time <= wall time
    assert busy.cpu_ms > 50 > idle.cpu_ms


def test_process_mode_batch_and_failures() -> None:
    src = "def run(ctx):\n    if ctx.params['i'] == 1:\n        raise ValueError('boom')\n    return ctx.params['i']\n"
    with sup(src, isolation="process") as s:
        rs = s.execute_batch([req(i=i) for i in range(3)])
    assert [r.status for r in rs] == ["ok", "error", "ok"]
