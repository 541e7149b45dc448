"""The scheduler's prefetch against the real gateway-fn: every read it answers is byte-for-byte the
reply the supervisor would have built from gateway-fn's answer for the same execution token."""

from __future__ import annotations

import json
import random

import pytest

from customscripts import db
from customscripts.gateway.client import GatewayClient
from customscripts.gateway.tokens import mint_execution_token
from customscripts.marketdata.loader import load_sample_data
from customscripts.outputs import OutputRow, OutputStore, params_hash
from customscripts.realtime.prefetch import MarketWindows, encode, output_entry
from customscripts.sandbox import protocol
from customscripts.sandbox.datasource import DependencyUnavailable
from customscripts.sandbox.prefetch import Prefetched
from customscripts.sandbox.reads import _binary_reply

DAY = 86400.0


@pytest.fixture(scope="module")
def goog_times(stack) -> list[float]:
    load_sample_data(stack, echo=lambda _m: None)
    with db.pool(stack.pg_reader_dsn).connection() as conn:
        return [r[0] for r in conn.execute("SELECT extract(epoch FROM end_time)::float8 FROM candles WHERE "
                                           "instrument_key = 'GOOG' AND timeframe = '1d' ORDER BY time")]


def client(stack, uid: str, as_of: float, deps: list[str] | None = None, tenant: str | None = None) -> GatewayClient:
    token = mint_execution_token(user=f"u-{uid}", tenant=tenant or f"t-{uid}", script_id=f"s-{uid}", version=1,
                                 deps=deps or [], as_of=as_of, tier="pro", realtime=True)
    return GatewayClient(stack.data_gateway_url, token)


def test_candle_windows_equal_gateway_answers(stack, uid, goog_times) -> None:
    rng = random.Random(uid)
    events = [goog_times[-1 - i] for i in range(5)]  # a batch of five ticks, as the scheduler sees it
    windows = MarketWindows(db.pool(stack.pg_reader_dsn, max_size=2)).fetch(
        {("GOOG", "1d"): (max(events), 200 + len(events)), ("NOPE", "1d"): (max(events), 205)})
    assert windows[("NOPE", "1d")].n == 0 and windows[("NOPE", "1d")].complete
    data = encode(f"t-{uid}", windows.values(), [])
    pre = Prefetched.parse(data, tenant=f"t-{uid}", dependencies=[])
    served = 0
    for _ in range(40):
        as_of = rng.choice(events) + rng.choice([0.0, -1.0, 0.5e-6])
        limit = rng.choice([1, 3, 20, 200, 201])
        end = None if rng.random() < 0.6 else as_of - DAY * rng.randrange(0, 4)
        start = None if rng.random() < 0.6 else as_of - DAY * rng.randrange(1, 300)
        key = rng.choice(["GOOG", "GOOG", "NOPE"])
        clamped = as_of if end is None else min(end, as_of)
        frame = pre.market_frame(key, "1d", limit=limit, start=start, end=clamped, as_of=as_of)
        if frame is None:
            continue
        served += 1
        with client(stack, uid, as_of) as gw:
            answer = gw.get_market_data(key, "1d", limit=limit, start=start, end=end)
        assert frame == _binary_reply(answer), (key, as_of, limit, start, end)
    assert served >= 20


@pytest.mark.parametrize("value,metadata", [
    (3, {}), (-2.5e-300, {"b": 1, "aa": {"zz": [1, 2.5, None], "y": "é"}}),
    ({"upper": 2.0, "lower": 0.1}, {"n": 2**70}), (1e300, {"x": True, "": 0}),
])
def test_dependency_outputs_equal_gateway_answers(stack, uid, value, metadata) -> None:
    t = 1_700_000_000.123456 + random.random()  # not on a whole microsecond: rounded like the database
    row = OutputRow(time=t, tenant=f"t-{uid}", instrument_key="GOOG", timeframe="1d", script_id=f"dep-{uid}",
                    version=1, params_hash=params_hash({}), value=value, metadata=metadata)
    assert OutputStore(db.pool(stack.pg_dsn)).write_many([row]) == 1
    entry = output_entry(row)
    assert entry is not None
    pre = Prefetched.parse(encode(f"t-{uid}", [], [entry]), tenant=f"t-{uid}", dependencies=[f"dep-{uid}@1"])
    hit = pre.script_output(f"dep-{uid}", "GOOG", "1d", params_hash({}), t)
    with client(stack, uid, t, deps=[f"dep-{uid}@1"]) as gw:
        answer = gw.get_script_output(f"dep-{uid}", "GOOG", "1d")
    # compared as the child receives them: the supervisor's JSON frame of the reply
    assert protocol.frame({"ok": hit}, allow_nan=True) == protocol.frame({"ok": answer}, allow_nan=True)
    assert json.dumps(hit) == json.dumps(answer)
    with client(stack, uid, t, deps=[f"dep-{uid}@1"], tenant=f"other-{uid}") as gw, \
            pytest.raises(DependencyUnavailable):
        gw.get_script_output(f"dep-{uid}", "GOOG", "1d")  # and the gateway never crosses tenants either


BASE = """
def run(ctx):
    a = get_market_data(limit=5)
    b = get_market_data(start=ctx.timestamp - 10 * 86400, limit=4)
    return {"value": float(a.close.sum()) + len(b), "metadata": {"t": float(a.time[-1]), "n": {"b": 1, "aa": 2}}}
"""
DEPENDENT = """
def run(ctx):
    base = get_script_output("{base}")
    long = get_market_data(limit=250)  # more than the prefetched window: read through the gateway
    return {{"value": base["value"] + float(long.close[0]), "metadata": {{"m": base["metadata"], "n": len(long)}}}}
"""


def test_prefetch_changes_nothing_but_speed(api_callers, stack) -> None:
    """The same scripts and events evaluated with and without prefetch publish identical outputs."""
    from customscripts.app import app
    from customscripts.realtime.events import Event
    from tests.integration.realtime_support import rows

    results = []
    times = [t for t, in _last_closes(stack, 4)]
    for caller, prefetch in api_callers:
        base, dep = caller.sid(f"pfb-{caller.user_id}"), caller.sid(f"pfd-{caller.user_id}")
        caller.create_published(base, BASE)
        caller.create_published(dep, DEPENDENT.format(base=base), depends_on=[f"{base}@1"])
        for sid in (base, dep):
            resp = caller.call("POST", f"/scripts/{sid}/subscribe", {"instrument_key": "GOOG", "timeframe": "1d",
                                                                     "backfill": 0})
            assert resp.status_code == 201, resp.text
        evaluator = app().evaluator(stack)
        evaluator.prefetch = prefetch
        try:
            report = evaluator.process([Event("GOOG", "1d", t) for t in times])
        finally:
            evaluator.close()
        mine = [e.status for n, e in report.results.items() if n.tenant == caller.tenant]
        # with prefetch most reads never reach gateway-fn (the 250-bar read and the history-less window
        # start do); without it every read does
        assert (report.prefetched_reads >= 12) if prefetch else (report.prefetched_reads == 0)
        assert mine == ["ok"] * 8, report.results
        results.append([[r[0], r[3]] for r in rows(stack, caller.tenant, base)] +
                       [[r[0], r[3]] for r in rows(stack, caller.tenant, dep)])
    assert results[0] == results[1] and len(results[0]) == 8


def _last_closes(stack, n: int) -> list[tuple[float]]:
    with db.pool(stack.pg_reader_dsn).connection() as conn:
        return conn.execute("SELECT extract(epoch FROM end_time)::float8 FROM candles WHERE instrument_key = 'GOOG' "
                            "AND timeframe = '1d' ORDER BY time DESC LIMIT %s", (n,)).fetchall()[::-1]


@pytest.fixture
def api_callers(stack, uid, goog_times):
    from tests.integration.realtime_support import drop_subscriptions
    from tests.integration.registry_support import Caller

    callers = [(Caller(stack.registry_url, f"pf{i}-{uid}", f"pf{i}-tenant-{uid}"), prefetch)
               for i, prefetch in enumerate((True, False))]
    yield callers
    for caller, _ in callers:
        drop_subscriptions(stack, caller.tenant)
