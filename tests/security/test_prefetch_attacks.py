"""Attacks on the prefetch path (data the scheduler sends along with a realtime batch, answered by the
supervisor instead of gateway-fn). Real bubblewrap sandbox and the real script-function handler.

What must hold: a script never sees prefetched data after its as-of time, another tenant's outputs,
or outputs of a script outside its dependencies; and nobody but the platform (holder of the
invocation secret) can make a function use a prefetch - an invocation token alone is not enough.
"""

from __future__ import annotations

import base64
import json
from array import array
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest

from customscripts.outputs import params_hash
from customscripts.sandbox import ExecutionRequest, SampleDataSource
from customscripts.sandbox.invocation import mint_invocation_token, sign_prefetch
from customscripts.sandbox.prefetch import WIRE_VERSION, Prefetched
from tests.script_function import configure, script_handler

from .conftest import GOOG_TS, make_supervisor

DAY = 86400.0
MARKER = 99999.0  # close of every prefetched candle after the item's as-of time


def goog_window(hi: float, n: int, *, future: int = 0, key: str = "GOOG") -> dict:
    """A window of n daily candles, the last ending at hi, plus `future` candles after hi marked MARKER."""
    times = [hi - DAY * (n - 1 - i) for i in range(n)] + [hi + DAY * (i + 1) for i in range(future)]
    cols = array("d", [t - DAY for t in times])  # starts; the ends (what as-of reads compare) follow
    cols.extend(times)
    for _ in range(5):
        cols.extend([1.0] * n + [MARKER] * future)
    return {"instrument_key": key, "timeframe": "1d", "hi": times[-1], "complete": False, "n": len(times),
            "cols": base64.b64encode(cols.tobytes()).decode()}


LOOKAHEAD = """
def run(ctx):
    a = get_market_data(limit=500, end=ctx.timestamp + 10**9)
    b = get_market_data(start=ctx.timestamp - 5 * 86400, end=ctx.timestamp + 10**9, limit=50)
    c = get_market_data(limit=3)
    times = list(a.time) + list(b.time) + list(c.time)
    closes = list(a.close) + list(b.close) + list(c.close)
    return {"value": float(max(times)), "metadata": {"marker": 99999.0 in closes, "n": len(times)}}
"""


@pytest.mark.parametrize("guards", [False, True])
def test_prefetched_candles_after_the_as_of_time_are_never_visible(guards: bool) -> None:
    """A window reaching past the item's as-of (as a stale or forged prefetch might): the supervisor
    clamps every read to the item's timestamp; what the window cannot answer goes to the data source."""
    ts = GOOG_TS - 30 * DAY
    pre = Prefetched.parse(json.dumps({"v": WIRE_VERSION, "tenant": "t1", "market": [goog_window(ts, 300, future=30)]}),
                           tenant="t1", dependencies=[])
    with make_supervisor(LOOKAHEAD, guards=guards) as sup:
        res = sup.execute(ExecutionRequest("GOOG", "1d", {}, ts, prefetch=pre))
    assert res.status == "ok", res.to_dict()
    assert res.output["value"] <= ts and res.output["metadata"]["marker"] is False
    assert pre.hits >= 2  # answered from the prefetch, not by luck from the data source


OTHER_SERIES = """
def run(ctx):
    bars = get_market_data(instrument_key="MSFT", limit=3)
    return {"value": float(bars.close[-1]), "metadata": {}}
"""


def test_another_items_window_is_not_served() -> None:
    """A window sent for another item of the batch (another instrument) never answers this item's reads:
    they go to the data source, which decides (here it has no MSFT: the read fails)."""
    market = [goog_window(GOOG_TS, 10, key="MSFT")]
    pre = Prefetched.parse(json.dumps({"v": WIRE_VERSION, "tenant": "t1", "market": market}),
                           tenant="t1", dependencies=[])
    with make_supervisor(OTHER_SERIES, guards=False) as sup:
        res = sup.execute(ExecutionRequest("GOOG", "1d", {}, GOOG_TS, prefetch=pre))
    assert pre.hits == 0 and res.status != "ok"


DEPENDENT = """
def run(ctx):
    dep = get_script_output("dep")
    try:
        other = get_script_output("secret")["value"]
    except DataError as exc:
        other = type(exc).__name__
    return {"value": float(dep["value"]), "metadata": {"ts": dep["timestamp"], "other": other}}
"""


def test_a_prefetched_output_serves_only_its_own_event() -> None:
    """The dependency's output for event T is not "latest as of" a later item (a newer row may exist):
    that read goes to the data source (here the sample source, which has no outputs)."""
    entry = {"script_id": "dep", "version": 1, "instrument_key": "GOOG", "timeframe": "1d",
             "params_hash": params_hash({}), "time": GOOG_TS - DAY, "value": 7.0, "timestamp": GOOG_TS - DAY,
             "metadata": {}}
    pre = Prefetched.parse(json.dumps({"v": WIRE_VERSION, "tenant": "t1", "outputs": [entry]}), tenant="t1",
                           dependencies=["dep@1"])
    with make_supervisor(DEPENDENT, guards=False) as sup:
        same = sup.execute(ExecutionRequest("GOOG", "1d", {}, GOOG_TS - DAY, prefetch=pre))
        later = sup.execute(ExecutionRequest("GOOG", "1d", {}, GOOG_TS, prefetch=pre))
    assert same.status == "ok" and same.output["value"] == 7.0
    assert same.output["metadata"]["other"] != 7.0  # "secret" was never prefetched: not answered from it
    assert later.status != "ok" or later.output["value"] != 7.0


# ---------------------------------------------------------------------- through the function's handler

@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    meta = {"script_id": "pf-attack", "version": 1, "tier": "pro", "tenant": "t1", "depends_on": ["dep@1"],
            "output_schema": {}, "limits": {}}
    with script_handler(tmp_path_factory.mktemp("fn"), "cs-pf-attack-v1", DEPENDENT, meta) as module:
        yield module


@pytest.fixture
def fn(handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> str:
    # no gateway here: a read the prefetch does not answer fails (it never silently succeeds)
    configure(monkeypatch, gateway_url="http://127.0.0.1:9", function_sample_data=False)
    return handler.function.name


def output(script_id: str, version: int = 1, tenant_value: float = 7.0) -> dict:
    return {"script_id": script_id, "version": version, "instrument_key": "GOOG", "timeframe": "1d",
            "params_hash": params_hash({}), "time": GOOG_TS, "value": tenant_value, "timestamp": GOOG_TS,
            "metadata": {}}


def body(fn: str, *, tenant: str = "t1", data_tenant: str | None = None, outputs: list | None = None,
         sign_secret: str | None = None, sign_fn: str | None = None) -> dict:
    items = [{"instrument_key": "GOOG", "timeframe": "1d", "params": {}, "timestamp": GOOG_TS}]
    data = json.dumps({"v": WIRE_VERSION, "tenant": data_tenant or tenant, "outputs": outputs or [output("dep")]})
    return {"items": items, "execution_token": "not-a-valid-execution-token",
            "prefetch": sign_prefetch(sign_fn or fn, tenant, items, "not-a-valid-execution-token", data,
                                      secret=sign_secret)}


def call(handler: ModuleType, fn: str, payload: dict, *, tenant: str = "t1", token: str | None = None) -> dict:
    token = token if token is not None else mint_invocation_token(fn, {"user": "u1", "tenant": tenant}, 60)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    res = handler.handle(SimpleNamespace(body=json.dumps(payload).encode(), headers=headers, method="POST",
                                         path="/", query={}), None)
    return {"status": res["statusCode"], **json.loads(res["body"])}


def test_handler_uses_a_platform_signed_prefetch(handler: ModuleType, fn: str) -> None:
    res = call(handler, fn, body(fn))
    assert res["status"] == 200, res
    (item,) = res["results"]
    assert item["status"] == "ok" and item["output"]["value"] == 7.0
    assert item["output"]["metadata"]["other"] in ("DataAccessError", "DataDenied")  # not prefetched: gateway


def test_prefetch_cannot_be_forged_with_only_an_invocation_token(handler: ModuleType, fn: str) -> None:
    forged = body(fn, sign_secret="attacker-guess")
    assert call(handler, fn, forged)["error"]["code"] == "invalid_prefetch"
    data = json.dumps({"v": WIRE_VERSION, "tenant": "t1", "outputs": [output("dep")]})
    unsigned = {**body(fn), "prefetch": {"data": data, "exp": 2**31, "mac": ""}}
    assert call(handler, fn, unsigned)["error"]["code"] == "invalid_prefetch"
    replayed = body(fn)  # a genuine prefetch, re-used with other items
    replayed["items"][0]["timestamp"] = GOOG_TS + DAY
    assert call(handler, fn, replayed)["error"]["code"] == "invalid_prefetch"
    other_fn = body(fn, sign_fn="cs-other-function-v1")
    assert call(handler, fn, other_fn)["error"]["code"] == "invalid_prefetch"
    assert call(handler, fn, body(fn), token="")["status"] == 401  # no invocation token at all


def test_prefetch_of_another_tenant_is_refused(handler: ModuleType, fn: str) -> None:
    # signed for tenant t2 but invoked under a t1 token, and the other way round
    assert call(handler, fn, body(fn, tenant="t2"), tenant="t1")["error"]["code"] == "invalid_prefetch"
    assert call(handler, fn, body(fn, tenant="t1", data_tenant="t2"))["error"]["code"] == "invalid_prefetch"


def test_prefetched_outputs_outside_the_dependencies_are_refused(handler: ModuleType, fn: str) -> None:
    for outs in ([output("secret")], [output("dep", version=2)], [output("dep"), output("secret")]):
        res = call(handler, fn, body(fn, outputs=outs))
        assert res["status"] == 400 and res["error"]["code"] == "invalid_prefetch", res


def test_sample_source_is_not_a_prefetch_bypass() -> None:
    """Without a prefetch nothing changes: the data source answers (sanity for the tests above)."""
    with make_supervisor(LOOKAHEAD, guards=False, data=SampleDataSource()) as sup:
        res = sup.execute(ExecutionRequest("GOOG", "1d", {}, GOOG_TS - 30 * DAY))
    assert res.status == "ok" and res.output["value"] <= GOOG_TS - 30 * DAY


# ---------------------------------------------------------------------- the child's own answers (handover)

HOARDER = """
seen = []

def run(ctx):
    bars = get_market_data(limit=200, end=ctx.timestamp + 10**9)
    seen.append(float(max(bars.time)))
    return {"value": float(max(seen)), "metadata": {"n": len(bars), "marker": 99999.0 in list(bars.close)}}
"""


@pytest.mark.parametrize("guards", [False, True])
def test_a_child_never_holds_a_later_events_data(guards: bool) -> None:
    """A batch of three events on one series, with a window reaching past all of them: the child
    answers each item's reads itself, but from data cut at that item's event, handed over only when
    the event starts - so even a script hoarding everything in module state never sees a later bar."""
    last = GOOG_TS - 30 * DAY
    pre = Prefetched.parse(json.dumps({"v": WIRE_VERSION, "tenant": "t1",
                                       "market": [goog_window(last, 300, future=30)]}), tenant="t1", dependencies=[])
    events = [last - 2 * DAY, last - DAY, last]
    with make_supervisor(HOARDER, guards=guards) as sup:
        results = sup.execute_batch([ExecutionRequest("GOOG", "1d", {}, t, prefetch=pre) for t in events])
    assert [r.status for r in results] == ["ok"] * 3, [r.to_dict() for r in results]
    for res, t in zip(results, events, strict=True):
        assert res.output["value"] <= t and res.output["metadata"]["marker"] is False
    assert pre.hits == 3  # answered by the child from the handover, not by the data source


EQUAL = """
def run(ctx):
    out = {}
    for name, kw in [("a", {}), ("b", {"limit": 7}), ("c", {"end": ctx.timestamp - 3 * 86400, "limit": 4}),
                     ("d", {"start": ctx.timestamp - 9 * 86400, "limit": 5}), ("e", {"limit": 10**6}),
                     ("f", {"start": ctx.timestamp - 9 * 86400, "end": ctx.timestamp - 2 * 86400})]:
        bars = get_market_data(**kw)
        out[name] = [len(bars), bars.keys(), [float(bars[c].sum()) for c in bars.keys()],
                     [float(bars[c][-1]) for c in bars.keys()] if len(bars) else [],
                     bars.instrument_key, bars.timeframe]
    bars = get_market_data(limit=3)
    bars.close[0] = -1.0  # the script's own copy: a second read is unchanged
    out["g"] = list(get_market_data(limit=3).close)
    for bad in ({"limit": 0}, {"limit": True}, {"end": float("nan")}, {"instrument_key": 5}):
        try:
            get_market_data(**bad)
            out[str(bad)] = "answered"
        except Exception as exc:
            out[str(bad)] = type(exc).__name__
    return {"value": 1.0, "metadata": out}
"""


def test_the_childs_answers_equal_the_supervisors() -> None:
    """The same reads answered by the child from a handover and by the supervisor from the same prefetch
    (test_realtime_prefetch checks those against gateway-fn) give the same bars, copies and errors."""
    from customscripts.sandbox.sampledata import SampleDataSource

    data = SampleDataSource().preload()
    cols = data.get_market_data("GOOG", "1d", limit=400, end=GOOG_TS)["columns"]
    blob = array("d")
    for name in ("time", "end_time", "open", "high", "low", "close", "volume"):
        blob.extend(cols[name])
    window = {"instrument_key": "GOOG", "timeframe": "1d", "hi": GOOG_TS, "complete": False,
              "n": len(cols["time"]), "cols": base64.b64encode(blob.tobytes()).decode()}
    wire = json.dumps({"v": WIRE_VERSION, "tenant": "t1", "market": [window]})
    pre, kept = (Prefetched.parse(wire, tenant="t1", dependencies=[]) for _ in range(2))
    # an empty handover: the supervisor answers every read
    kept.handover = lambda _series, as_of: Prefetched.handover(kept, (), as_of)  # type: ignore[method-assign]
    events = [GOOG_TS - 5 * DAY, GOOG_TS]
    with make_supervisor(EQUAL, guards=True, data=data) as sup:
        local = sup.execute_batch([ExecutionRequest("GOOG", "1d", {}, t, data=data, prefetch=pre) for t in events])
        remote = sup.execute_batch([ExecutionRequest("GOOG", "1d", {}, t, data=data, prefetch=kept) for t in events])
    assert [r.status for r in local + remote] == ["ok"] * 4, [r.to_dict() for r in local + remote]
    for mine, theirs in zip(local, remote, strict=True):
        for name in theirs.output["metadata"]:
            assert mine.output["metadata"][name] == theirs.output["metadata"][name], name
    assert pre.hits >= kept.hits >= 2 * 5 and kept.bars == pre.bars  # (repeated reads: cached there)


FORGER = """
import gc

def run(ctx):
    get_market_data(limit=3)
    forged = 0
    for o in gc.get_objects():  # the runtime's own record of what it answered from the handover
        if type(o).__name__ == "SegmentData":
            o.hits, o.bars = 10**9, 10**9
            forged += 1
    return {"value": 1.0, "metadata": {"forged": forged}}
"""


def test_a_childs_claim_of_local_reads_is_bounded_by_what_the_supervisor_allowed_and_sent() -> None:
    """With the guard layer off a script can rewrite the runtime's count of the reads it answered from
    the handover (the `local` claim of its item message). The claim only feeds the prefetch's
    counters, and the supervisor clamps it: reads to the per-item call limit, bars to the rows it
    handed over - so no window the scheduler sizes from it grows past what was already sent."""
    last = GOOG_TS - 30 * DAY
    pre = Prefetched.parse(json.dumps({"v": WIRE_VERSION, "tenant": "t1", "market": [goog_window(last, 40)]}),
                           tenant="t1", dependencies=[])
    events = [last - DAY, last]
    with make_supervisor(FORGER, guards=False) as sup:
        results = sup.execute_batch([ExecutionRequest("GOOG", "1d", {}, t, prefetch=pre) for t in events])
        max_calls = sup.max_calls
    assert [r.status for r in results] == ["ok"] * 2, [r.to_dict() for r in results]
    assert all(r.output["metadata"]["forged"] >= 1 for r in results)  # the forgery itself took place
    # each event is handed over: per item at most the call limit is counted, plus the one read each
    # really made; bars never more than the rows handed over (the window's 40 at most), so the next
    # event's handover, sized from them, holds no more than the whole window cut at its as-of
    assert 2 <= pre.hits <= 2 * max_calls + 2
    assert 3 <= pre.bars <= 40


GROWING = """
def run(ctx):
    n = int(ctx.params.get("last", 0)) if ctx.timestamp >= ctx.params.get("from", 10**12) else 3
    bars = get_market_data(limit=n or 3)
    return {"value": float(bars.end_time[-1]), "metadata": {"n": len(bars), "first": float(bars.end_time[0])}}
"""


def test_a_handover_holds_the_candles_the_reads_needed_and_a_larger_read_still_gets_its_answer() -> None:
    """One-item events (a series' bar ends) are each handed over, cut to the candles the reads so far
    needed; an item that reads more than was handed gets the whole answer from the supervisor, and
    later handovers grow to it. Nothing after an item's as-of is in any of them."""
    last = GOOG_TS - 30 * DAY
    events = [last - DAY * i for i in range(5, -1, -1)]
    pre = Prefetched.parse(json.dumps({"v": WIRE_VERSION, "tenant": "t1", "market": [goog_window(last, 40)]}),
                           tenant="t1", dependencies=[])
    handed: list[tuple[float, int]] = []
    cut = pre.handover

    def recording(series, as_of):  # type: ignore[no-untyped-def]
        h = cut(series, as_of)
        handed.append((as_of, h.rows))
        return h

    pre.handover = recording  # type: ignore[method-assign]
    params = {"from": events[3], "last": 20}
    with make_supervisor(GROWING, guards=True) as sup:
        results = sup.execute_batch([ExecutionRequest("GOOG", "1d", params, t, prefetch=pre) for t in events])
    assert [r.status for r in results] == ["ok"] * len(events), [r.to_dict() for r in results]
    assert [r.output["value"] for r in results] == events  # each item's last candle is its own as-of
    assert [r.output["metadata"]["n"] for r in results] == [3, 3, 3, 20, 20, 20]
    assert [r.output["metadata"]["first"] for r in results] == \
        [t - DAY * (3 - 1) for t in events[:3]] + [t - DAY * (20 - 1) for t in events[3:]]
    assert [as_of for as_of, _ in handed] == events  # every event handed over
    rows = [n for _, n in handed]
    assert rows[0] == 40 - 5 and rows[1:4] == [3, 3, 3] and rows[4:] == [20, 20]
