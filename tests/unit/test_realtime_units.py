from __future__ import annotations

import json
import math
import random
from array import array
from datetime import UTC, datetime

import pytest

from customscripts.auth import Principal
from customscripts.errors import Invalid, Unauthenticated
from customscripts.gateway.tokens import mint_execution_token, verify_execution_token
from customscripts.outputs import OutputRow, params_hash
from customscripts.realtime.batches import BatchData
from customscripts.realtime.breakers import Breakers
from customscripts.realtime.evaluator import Evaluator
from customscripts.realtime.events import Event, parse_event, timeframe_seconds
from customscripts.realtime.planner import Evaluation, Node, assign_groups
from customscripts.realtime.prefetch import Window, encode, jsonb_normal, output_entry
from customscripts.realtime.scheduler import latency_summary
from customscripts.sandbox import prefetch as sp
from customscripts.sandbox.invocation import sign_prefetch, verify_prefetch


def test_candle_close_and_timer_events_parse():
    """A candle close happens at the bar's end: that is the event's time (ctx.timestamp, the outputs' stamp)."""
    candle = {"instrument_key": "GOOG", "timeframe": "1d", "time": 1357084800.0, "close": 1.0}
    closes_at = [Event("GOOG", "1d", 1357084800.0 + 86400)]
    assert parse_event("market.candle.GOOG.1d", json.dumps(candle).encode()) == closes_at
    with_end = {**candle, "end_time": 1357084800.0 + 86400}
    assert parse_event("market.candle.GOOG.1d", json.dumps(with_end).encode()) == closes_at
    monthly = {"instrument_key": "BTCUSD", "timeframe": "1mo", "time": datetime(2012, 1, 31, tzinfo=UTC).timestamp()}
    assert parse_event("s", json.dumps(monthly).encode())[0].time == datetime(2012, 2, 1, tzinfo=UTC).timestamp()
    tick = parse_event("market.candle._timer.1m", json.dumps({"timer": True, "timeframe": "1m", "time": 60}).encode())
    assert tick == [Event("", "1m", 60.0)]


@pytest.mark.parametrize("body", [b"[]", b'{"instrument_key": "../x", "timeframe": "1d", "time": 1}',
                                  b'{"instrument_key": "GOOG", "timeframe": "1d", "time": "NaN"}',
                                  b'{"instrument_key": "GOOG", "timeframe": "1d", "time": 0, "end_time": 0}'])
def test_malformed_events_are_rejected(body):
    with pytest.raises((ValueError, Invalid, KeyError)):
        parse_event("s", body)


def test_timeframe_seconds():
    assert [timeframe_seconds(tf) for tf in ("30s", "1m", "4h", "1d", "1w")] == [30, 60, 14400, 86400, 604800]


def test_realtime_tokens_carry_the_flag_and_others_do_not():
    common = dict(user="u", tenant="t", script_id="s", version=1, deps=[], as_of=1.0, tier="pro")
    assert verify_execution_token(mint_execution_token(**common, realtime=True)).realtime is True
    assert verify_execution_token(mint_execution_token(**common)).realtime is False


def test_latency_summary():
    assert latency_summary([]) == {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    summary = latency_summary([i / 1000 for i in range(1, 101)])
    assert summary["p50_ms"] == 51.0 and summary["p99_ms"] == 100.0


# ---------------------------------------------------------------------- prefetch (scheduler side + matching)

DAY = 86400.0
T0 = 1_600_000_000.0


def window(times: list[float], hi: float, complete: bool, key: str = "GOOG") -> Window:
    """Daily candles ending at `times` (what as-of reads compare) and starting a day before."""
    cols = array("d", [t - DAY for t in times])
    cols.extend(times)
    for c in range(5):
        cols.extend(float(c * 1000 + i) for i in range(len(times)))
    return Window(key, "1d", hi, len(times), complete, cols.tobytes())


def gateway_reference(db_times: list[float], limit: int, start: float | None, end: float) -> list[float]:
    """What gateway-fn's SQL returns (times only): rows <= end, the last `limit`, or with start the first
    `limit` from start - compared as PostgreSQL timestamps (microseconds)."""
    end_us = sp.epoch_us(end)
    rows = [t for t in db_times if round(t * 1e6) <= end_us]
    if start is None:
        return rows[-limit:] if limit else []
    start_us = sp.epoch_us(start)
    return [t for t in rows if round(t * 1e6) >= start_us][:limit]


def decode_frame(frame: bytes) -> tuple[dict, dict[str, list[float]]]:
    payload = bytearray(frame[4:])
    head, blob = sp.protocol.split_binary(payload)
    cols, pos = {}, 0
    for name, n in head["f64"]:
        arr = array("d")
        arr.frombytes(bytes(blob[pos:pos + 8 * n]))
        cols[name] = list(arr)
        pos += 8 * n
    return head, cols


def test_market_prefetch_answers_exactly_what_the_gateway_would_or_nothing():
    rng = random.Random(7)
    served = 0
    db_times = [T0 + DAY * i + (1e-6 if i % 7 == 0 else 0) for i in range(400)]  # whole microseconds, as stored
    for _ in range(3000):
        hi_i = rng.randrange(50, 400)
        n = rng.randrange(0, 260)
        lo_i = max(0, hi_i + 1 - n)
        times = db_times[lo_i:hi_i + 1]
        complete = lo_i == 0
        pre = sp.Prefetched([sp._Window(window(times, db_times[hi_i], complete).wire())])
        as_of = db_times[rng.randrange(0, 400)] + rng.choice([0.0, 0.4e-6, 0.6e-6, -0.4e-6, 3600.0])
        end = as_of if rng.random() < 0.6 else min(as_of, db_times[rng.randrange(0, 400)] + rng.choice([0, 1e-7]))
        start = None if rng.random() < 0.5 else db_times[rng.randrange(0, 400)] + rng.choice([0, -1e-7, 5e-7])
        limit = rng.choice([1, 3, 20, 200, 500])
        frame = pre.market_frame("GOOG", "1d", limit=limit, start=start, end=end, as_of=as_of)
        if frame is None:
            continue  # not certainly covered: the supervisor asks the gateway
        served += 1
        if start is not None and sp.epoch_us(start) > sp.epoch_us(end):
            raise AssertionError("an invalid window must go to the gateway (422)")
        head, cols = decode_frame(frame)
        assert head["ok"] == {"instrument_key": "GOOG", "timeframe": "1d", "as_of": as_of}
        ends = cols["end_time"]  # bars are read by their end (the gateway's `end_time` compare)
        assert ends == gateway_reference(db_times, limit, start, end)
        assert cols["time"] == [t - DAY for t in ends]
        assert all(t <= as_of + 1e-6 for t in ends)  # never a bar ending after the as-of time
        first = times.index(ends[0]) if ends else 0
        assert cols["close"] == [3000.0 + first + i for i in range(len(cols["time"]))]
    assert served > 200  # and it does answer the covered ones


def test_market_prefetch_refuses_other_keys_and_later_as_of():
    times = [T0 + DAY * i for i in range(300)]
    pre = sp.Prefetched([sp._Window(window(times, times[-1], False).wire())])
    common = dict(limit=20, start=None)
    assert pre.market_frame("MSFT", "1d", end=times[-1], as_of=times[-1], **common) is None
    assert pre.market_frame("GOOG", "1h", end=times[-1], as_of=times[-1], **common) is None
    assert pre.market_frame("GOOG", "1d", end=times[-1] + 1, as_of=times[-1] + 1, **common) is None
    assert pre.market_frame("GOOG", "1d", end=math.inf, as_of=times[-1], **common) is None
    assert pre.market_frame("GOOG", "1d", end=times[-1], as_of=times[-1], limit=5000, start=None) is None


def test_script_output_prefetch_is_per_event_params_and_dependency():
    row = OutputRow(time=T0, tenant="t1", instrument_key="GOOG", timeframe="1d", script_id="dep", version=2,
                    params_hash=params_hash({}), value={"b": 1.5, "aa": [1, 2]}, metadata={"zz": 1, "a": "x"})
    entry = output_entry(row)
    assert entry is not None and list(entry["value"]) == ["b", "aa"] and list(entry["metadata"]) == ["a", "zz"]
    data = encode("t1", [], [entry])
    pre = sp.Prefetched.parse(data, tenant="t1", dependencies=["dep@2"])
    ph = sp.params_hash(None)
    assert pre.script_output("dep", "GOOG", "1d", ph, T0) == {"value": entry["value"], "timestamp": T0,
                                                              "metadata": entry["metadata"]}
    assert pre.script_output("dep", "GOOG", "1d", ph, T0 - 1) is None  # another event (as-of earlier)
    assert pre.script_output("dep", "GOOG", "1d", ph, T0 + 1) is None  # later as-of: a newer row may exist
    assert pre.script_output("dep", "GOOG", "1d", sp.params_hash({"k": 1}), T0) is None
    assert pre.script_output("dep", "MSFT", "1d", ph, T0) is None
    with pytest.raises(sp.PrefetchError, match="another tenant"):
        sp.Prefetched.parse(data, tenant="t2", dependencies=["dep@2"])
    with pytest.raises(sp.PrefetchError, match="not a dependency"):
        sp.Prefetched.parse(data, tenant="t1", dependencies=["dep@1", "other@2"])


def test_params_hash_is_the_same_on_both_sides():
    for params in ({}, None, {"b": 1, "a": [1.5, "x"]}, {"é": {"z": None}}):
        assert sp.params_hash(params) == params_hash(params)


def test_jsonb_normal_mirrors_a_jsonb_round_trip_or_refuses():
    assert list(jsonb_normal({"bbb": 1, "a": 2, "cc": {"y": 1, "x": 2}})) == ["a", "cc", "bbb"]
    for bad in (1e20, -0.0, math.nan, "a\x00b"):
        with pytest.raises(ValueError):
            jsonb_normal({"v": bad})
    assert output_entry(OutputRow(time=T0, tenant="t", instrument_key="G", timeframe="1d", script_id="s",
                                  version=1, params_hash="h", value=1, metadata={"m": 1e300})) is None
    assert output_entry(OutputRow(time=T0 + 0.4e-6, tenant="t", instrument_key="G", timeframe="1d",
                                  script_id="s", version=1, params_hash="h", value=3))["timestamp"] == T0


def test_prefetch_mac_binds_function_tenant_items_and_expiry():
    items = [{"instrument_key": "GOOG", "timeframe": "1d", "params": {}, "timestamp": T0}]
    signed = sign_prefetch("cs-fn-v1", "t1", items, "tok", '{"v":1}', ttl=60)
    assert verify_prefetch(signed, "cs-fn-v1", "t1", items, "tok") == '{"v":1}'
    bad = [("cs-other-v1", "t1", items, "tok", signed), ("cs-fn-v1", "t2", items, "tok", signed),
           ("cs-fn-v1", "t1", [{**items[0], "timestamp": T0 + 1}], "tok", signed),
           ("cs-fn-v1", "t1", items, "other-token", signed),
           ("cs-fn-v1", "t1", items, "tok", {**signed, "data": '{"v":1,"market":[]}'}),
           ("cs-fn-v1", "t1", items, "tok", {**signed, "exp": signed["exp"] + 100}),
           ("cs-fn-v1", "t1", items, "tok", sign_prefetch("cs-fn-v1", "t1", items, "tok", "{}", secret="wrong"))]
    for fn, tenant, its, tok, pf in bad:
        with pytest.raises(Unauthenticated):
            verify_prefetch(pf, fn, tenant, its, tok)
    with pytest.raises(Unauthenticated, match="expired"):
        verify_prefetch(signed, "cs-fn-v1", "t1", items, "tok", now=signed["exp"] + 1)


class _Meta:
    def __init__(self, deps: list[tuple[str, int]]) -> None:
        self.deps = deps

    def dependencies(self) -> list[tuple[str, int]]:
        return self.deps


class _FakeInvoker:
    registry = None

    def __init__(self, sources: dict[tuple[str, int], tuple[list[tuple[str, int]], str]]) -> None:
        self.sources = sources

    def version(self, script_id: str, version: int):
        deps, source = self.sources[(script_id, version)]
        return _Meta(deps), source


def _evaluator(sources) -> Evaluator:
    ev = Evaluator(_FakeInvoker(sources), None, None, workers=1, market=None)  # type: ignore[arg-type]
    ev.close()
    return ev


def _eval(tenant: str, sid: str, ver: int, t: float, closure: list[tuple[str, int]], key: str = "GOOG") -> Evaluation:
    node = Node(tenant, sid, ver, params_hash({}), key, "1d", t)
    return Evaluation(node, {}, Principal("u", tenant, "pro", ()), closure)


def test_scheduler_offers_only_unambiguous_direct_dependency_outputs_of_the_event():
    sources = {("top", 1): ([("mid", 1), ("b", 2)], "get_script_output('mid')"), ("mid", 1): ([("b", 1)], ""),
               ("b", 1): ([], ""), ("b", 2): ([], "")}
    evaluator = _evaluator(sources)
    closure = [("b", 1), ("mid", 1), ("b", 2), ("top", 1)]
    top = _eval("t1", "top", 1, T0, closure)
    mid, b1, b2 = (_eval("t1", s, v, T0, []).node for s, v in (("mid", 1), ("b", 1), ("b", 2)))
    other_time = _eval("t1", "mid", 1, T0 - DAY, []).node
    data = BatchData(deps={top.node: [mid, b2, other_time]})
    for node in (mid, b1, b2, other_time):
        data.outputs[node] = {"script_id": node.script_id, "time": node.time}
    sent = json.loads(evaluator.invocations.prefetch("top", 1, "t1", [top], data))
    # mid: yes; b@2: two versions of b are readable (the gateway would choose), so no; another event: no
    assert [o["script_id"] for o in sent["outputs"]] == ["mid"] and sent["tenant"] == "t1"
    assert evaluator.invocations.prefetch("top", 1, "t2", [top], data) is None  # never across tenants


def test_batches_run_items_in_event_time_order():
    evaluator = _evaluator({("s", 1): ([], "get_market_data()")})
    evaluator.prefetch, evaluator.market = True, object()  # type: ignore[assignment]
    group = [_eval("t", "s", 1, T0 + DAY * (i % 3), [], key=f"K{i:03d}") for i in range(900, 0, -1)]
    chunked = evaluator.invocations.chunks
    for chunks in (chunked(("s", 1, "t"), group), chunked(("s", 1, "t"), group[::-1])):
        flat = [ev.node.time for chunk in chunks for ev in chunk]
        assert flat == sorted(flat) and len(flat) == 900
        assert all(len({(e.node.instrument_key, e.node.timeframe) for e in c}) <= 256 for c in chunks)


def test_trimmed_windows_keep_the_newest_candles_and_are_never_complete():
    times = [T0 + DAY * i for i in range(10)]
    full = window(times, times[-1], True)
    assert full.last(20) is full
    cut = sp._Window(full.last(3).wire())
    assert cut.n == 3 and not cut.complete and list(cut._decode()[0]) == times[-3:]
    pre = sp.Prefetched([cut])
    frame = pre.market_frame("GOOG", "1d", limit=3, start=None, end=times[-1], as_of=times[-1])
    assert decode_frame(frame)[1]["close"] == [3007.0, 3008.0, 3009.0] and pre.bars == 3
    assert pre.market_frame("GOOG", "1d", limit=4, start=None, end=times[-1], as_of=times[-1]) is None
    assert pre.bars == 4  # reported back to the scheduler: the next windows are longer


def test_window_wire_round_trip_uses_gateway_timestamps():
    hi = datetime(2021, 1, 1, tzinfo=UTC).timestamp()
    w = sp._Window(window([hi - DAY, hi], hi, True).wire())
    assert w._decode() is not None and list(w.ends) == [hi - DAY, hi]
    with pytest.raises(sp.PrefetchError):
        sp._Window({**window([hi], hi, True).wire(), "hi": math.nan})
    assert sp._Window(window([hi + DAY], hi, True).wire())._decode() is None  # a row after the as-of


# ---------------------------------------------------------------------- failures stay inside their function


def test_breaker_opens_after_strikes_cools_down_probes_and_doubles():
    import dataclasses

    from customscripts.config import settings

    cfg = dataclasses.replace(settings(), scheduler_breaker_strikes=2, scheduler_breaker_cooldown_s=10,
                              scheduler_breaker_cooldown_max_s=25, scheduler_max_items=1000)
    now = [100.0]
    breakers = Breakers(cfg, clock=lambda: now[0])
    key = ("s", 1, "t")
    assert not breakers.proven(key) and not breakers.is_open(key)  # new: probed first
    breakers.strike(key)
    assert not breakers.is_open(key) and not breakers.proven(key)
    breakers.strike(key)
    assert breakers.is_open(key)
    now[0] += 10.5
    assert not breakers.is_open(key) and not breakers.proven(key)  # half-open: one probe
    breakers.strike(key)
    assert breakers.is_open(key)
    now[0] += 10.5
    assert breakers.is_open(key)  # the second opening lasts twice as long
    now[0] += 10
    breakers.success(key, per_item_s=0.01)  # a clean probe: proven, one strike forgiven...
    assert breakers.proven(key) and not breakers.is_open(key)
    breakers.strike(key)  # ...so one more timeout opens it again, for longer
    now[0] += 24.5
    assert breakers.is_open(key)  # capped at the max (25), not 40
    now[0] += 1
    for _ in range(3):
        breakers.success(key, per_item_s=0.01)
    assert breakers.proven(key) and not breakers.is_open(key)
    assert breakers.chunk_cap(key, deadline_s=15) == 750  # half the deadline at 10 ms per item
    breakers.success(key, per_item_s=0.00001)
    assert breakers.chunk_cap(key, deadline_s=15) == 1000  # never above scheduler_max_items
    breakers.strike(key, hard=True)  # an invocation past its deadline opens it at once
    assert breakers.is_open(key)
    assert not breakers.is_open(("s", 1, "other-tenant"))  # per function *and tenant*


def test_breaker_forgives_openings_once_the_function_stays_clean():
    import dataclasses

    from customscripts.config import settings

    cfg = dataclasses.replace(settings(), scheduler_breaker_strikes=1, scheduler_breaker_cooldown_s=10,
                              scheduler_breaker_cooldown_max_s=100)
    now = [0.0]
    breakers = Breakers(cfg, clock=lambda: now[0])
    key = ("s", 1, "t")
    breakers.strike(key)  # open 10 s
    now[0] += 11
    breakers.strike(key)  # open 20 s
    now[0] += 21
    breakers.success(key, per_item_s=0.01)
    now[0] += 100  # clean for the longest cool-down
    breakers.success(key, per_item_s=0.01)
    breakers.strike(key)
    now[0] += 10.5
    assert not breakers.is_open(key)  # back to the first cool-down


def test_batches_are_grouped_per_principal_and_audience():
    alice, bob = Principal("alice", "t", "pro", ()), Principal("bob", "t", "pro", ())

    def ev(user: Principal, phash: str, sid: str = "s") -> Evaluation:
        return Evaluation(Node("t", sid, 1, phash, "GOOG", "1d", T0), {}, user, [])

    mine, theirs, shared, dep = ev(alice, "p1"), ev(bob, "p2"), ev(bob, "p3"), ev(bob, params_hash({}), "dep")
    mine.audience, theirs.audience, shared.audience = {"alice"}, {"bob"}, {"bob", "carol"}
    evals = {e.node: e for e in (mine, theirs, shared, dep)}
    deps = {theirs.node: [dep.node], shared.node: [dep.node]}
    assign_groups(evals, deps)
    assert dep.audience == {"bob", "carol"}  # read by both of its dependents' audiences
    groups = {mine.group, theirs.group, shared.group}
    assert len(groups) == 3  # no two of them share a child
    assert mine.group[:5] == ("s", 1, "t", "alice", "pro") and theirs.group[:5] == ("s", 1, "t", "bob", "pro")


def test_result_wire_form_has_every_field_and_drops_only_empty_meta():
    import dataclasses

    from customscripts.sandbox.results import ExecutionResult

    names = {f.name for f in dataclasses.fields(ExecutionResult)}
    assert set(ExecutionResult("ok", meta={"a": 1}).to_dict()) == names
    assert set(ExecutionResult("ok").to_dict()) == names - {"meta"}
