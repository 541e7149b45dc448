"""The data gateway over HTTP against the real stack: as-of bounds, tenant isolation, auth, closure, 429."""

from __future__ import annotations

import dataclasses
import socket
import time
from array import array
from datetime import UTC, datetime

import psycopg
import pytest
import redis
import requests

from customscripts.gateway.api import GatewayApi
from customscripts.gateway.ratelimit import RateLimiter
from customscripts.gateway.tokens import mint_execution_token
from customscripts.http import LocalServer
from customscripts.marketdata.loader import CsvRow, load_rows
from customscripts.outputs import OutputRow, OutputStore, params_hash
from customscripts.sandbox.protocol import COLUMNS_MEDIA_TYPE, split_binary
from tests.waiting import wait_until

T0 = 1_600_000_000.0  # bars at T0, T0+60, ... (1m)
N_BARS = 10


@pytest.fixture(scope="module")
def gateway(stack):
    api = GatewayApi(stack)
    server = LocalServer(api.handle).start()
    server.api = api
    yield server
    server.stop()


def _announced(api: GatewayApi, instrument: str, timeframe: str, before: int) -> None:
    """Wait (bounded) until the gateway's candle feed has seen a change to this series."""
    assert wait_until(lambda: api._series_gen.get((instrument, timeframe), 0) != before, interval=0.002), \
        "no candle notification arrived"


@pytest.fixture
def data(stack, uid):
    """A private instrument with N_BARS candles, a metric per bar, and outputs of one script in 2 tenants."""
    instrument = f"T{uid}"
    rows = [CsvRow(datetime.fromtimestamp(T0 + 60 * i, tz=UTC), str(100 + i), str(101 + i), str(99 + i),
                   str(100.5 + i), str(1000 * (i + 1))) for i in range(N_BARS)]
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
        assert load_rows(conn, instrument, "1m", rows) == N_BARS
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO metrics (time, instrument_key, name, value, source) "
                            "VALUES (%s, %s, 'test.m', %s, 'test')",
                            [(r.time, instrument, float(i)) for i, r in enumerate(rows)])
    from customscripts import db

    store = OutputStore(db.pool(stack.pg_dsn))
    script = f"dep-{uid}"
    out = []
    for tenant, base in ((f"ta-{uid}", 0.0), (f"tb-{uid}", 1000.0)):
        for i in range(N_BARS):
            out.append(OutputRow(time=T0 + 60 * i, tenant=tenant, instrument_key=instrument, timeframe="1m",
                                 script_id=script, version=1, params_hash=params_hash({}),
                                 value=base + i, metadata={"i": i}))
    assert store.write_many(out) == 2 * N_BARS
    return {"instrument": instrument, "script": script, "ta": f"ta-{uid}", "tb": f"tb-{uid}", "uid": uid}


def _token(data, *, tenant=None, as_of=T0 + 60 * 4, deps=None, tier="enterprise", **kw):
    return mint_execution_token(user=f"u-{data['uid']}", tenant=tenant or data["ta"],
                                script_id=f"me-{data['uid']}", version=1,
                                deps=[f"{data['script']}@1"] if deps is None else deps,
                                as_of=as_of, tier=tier, **kw)


def _get(gateway, path, token, **params):
    return requests.get(gateway.url + path, params=params, headers={"Authorization": f"Bearer {token}"},
                        timeout=10)


# ------------------------------------------------------------------ as-of: no lookahead


def test_market_reads_never_pass_the_as_of_time(gateway, data):
    """A bar is visible from its end: as of 4.5 minutes the bar started at 4 minutes (closing at 5) is
    not there yet (bartime.py); `start`/`end` bound the bars' ends too."""
    token = _token(data, as_of=T0 + 60 * 4 + 30)  # inside bar 4, after the end of bar 3
    body = _get(gateway, "/data/market", token, instrument_key=data["instrument"], timeframe="1m").json()
    assert body["columns"]["time"] == [T0 + 60 * i for i in range(4)]
    assert body["columns"]["end_time"] == [T0 + 60 * i for i in range(1, 5)]
    assert body["columns"]["close"] == [100.5 + i for i in range(4)]
    # an explicit end in the future is clamped to as-of; start/limit still apply
    body = _get(gateway, "/data/market", token, instrument_key=data["instrument"], timeframe="1m",
                start=T0 + 60, end=T0 + 10_000, limit=2).json()
    assert body["columns"]["end_time"] == [T0 + 60, T0 + 120]
    body = _get(gateway, "/data/market", token, instrument_key=data["instrument"], timeframe="1m",
                limit=2).json()
    assert body["columns"]["time"] == [T0 + 120, T0 + 180]
    at_end = _token(data, as_of=T0 + 60 * 5)  # bar 4's end: now it is there
    body = _get(gateway, "/data/market", at_end, instrument_key=data["instrument"], timeframe="1m", limit=1).json()
    assert body["columns"]["time"] == [T0 + 240]
    just_before = _token(data, as_of=T0 + 60 * 5 - 1e-6)
    body = _get(gateway, "/data/market", just_before, instrument_key=data["instrument"], timeframe="1m",
                limit=1).json()
    assert body["columns"]["time"] == [T0 + 180]


def test_cached_market_windows_see_candles_inserted_later(stack, gateway, data):
    """The gateway caches market windows; a candle backfilled inside a cached window shows up as soon as
    its notification has arrived."""
    instrument = data["instrument"]
    token = _token(data, as_of=T0 + 60 * 20)
    reads = [{"limit": 3}, {"limit": 50}, {"start": T0 + 60 * 8, "limit": 5}, {"start": T0 + 60 * 8, "limit": 1}]
    first = [_get(gateway, "/data/market", token, instrument_key=instrument, timeframe="1m", **q).json()
             for q in reads]
    again = [_get(gateway, "/data/market", token, instrument_key=instrument, timeframe="1m", **q).json()
             for q in reads]
    assert again == first  # served from the cache, byte-identical content
    assert first[0]["columns"]["time"] == [T0 + 60 * i for i in (7, 8, 9)]
    # backfill: one candle inside every window above (between bars 8 and 9), one after the last bar
    late = [CsvRow(datetime.fromtimestamp(T0 + 60 * 8 + 30, tz=UTC), "1", "2", "0.5", "1.5", "10"),
            CsvRow(datetime.fromtimestamp(T0 + 60 * 15, tz=UTC), "1", "2", "0.5", "7.5", "10")]
    before = gateway.api._series_gen.get((instrument, "1m"), 0)
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
        assert load_rows(conn, instrument, "1m", late) == 2
    _announced(gateway.api, instrument, "1m", before)
    after = [_get(gateway, "/data/market", token, instrument_key=instrument, timeframe="1m", **q).json()
             for q in reads]
    assert after[0]["columns"]["time"] == [T0 + 60 * 8 + 30, T0 + 60 * 9, T0 + 60 * 15]
    assert after[1]["columns"]["time"][-3:] == after[0]["columns"]["time"] and len(after[1]["columns"]["time"]) == 12
    assert after[2]["columns"]["time"] == [T0 + 60 * 7, T0 + 60 * 8, T0 + 60 * 8 + 30, T0 + 60 * 9, T0 + 60 * 15]
    assert after[3] == first[3]  # [start, its only row] holds no new candle: unchanged
    # as-of still holds for cached windows: an earlier as-of never sees the late candles
    early = _token(data, as_of=T0 + 60 * 8 + 10)
    body = _get(gateway, "/data/market", early, instrument_key=instrument, timeframe="1m", limit=3).json()
    assert body["columns"]["time"] == [T0 + 60 * 5, T0 + 60 * 6, T0 + 60 * 7]


def _columns(gateway, path, token, **params):
    """A read asking for native float64 columns, decoded back to {head, columns as lists}."""
    resp = requests.get(gateway.url + path, params=params, timeout=10,
                        headers={"Authorization": f"Bearer {token}", "Accept": COLUMNS_MEDIA_TYPE})
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == COLUMNS_MEDIA_TYPE
    head, blob = split_binary(bytearray(resp.content))
    spec, columns, offset = head.pop("f64"), {}, 0
    for name, n in spec:
        columns[name] = array("d", bytes(blob[offset:offset + 8 * n])).tolist()
        offset += 8 * n
    assert offset == len(blob)
    return {**head, "columns": columns}


def test_columns_replies_carry_exactly_the_json_numbers(gateway, data):
    """Market and metric reads in native float64 equal the JSON answer, cached windows and as-of
    included; errors stay JSON."""
    instrument = data["instrument"]
    token = _token(data, as_of=T0 + 60 * 6 + 5)
    for query in ({}, {"limit": 3}, {"start": T0 + 60, "limit": 2}, {"start": T0 + 60, "end": T0 + 10_000}):
        for _ in range(2):  # the second read is served from the window cache
            as_json = _get(gateway, "/data/market", token, instrument_key=instrument, timeframe="1m", **query).json()
            as_f64 = _columns(gateway, "/data/market", token, instrument_key=instrument, timeframe="1m", **query)
            assert as_f64 == as_json and as_json["columns"]["end_time"][-1] <= T0 + 60 * 6 + 5
    as_json = _get(gateway, "/data/metrics", token, instrument_key=instrument, name="test.m").json()
    assert _columns(gateway, "/data/metrics", token, instrument_key=instrument, name="test.m") == as_json
    empty = _columns(gateway, "/data/market", token, instrument_key=f"NONE{data['uid']}", timeframe="1m")
    assert empty["columns"] == {name: [] for name in ("time", "end_time", "open", "high", "low", "close", "volume")}
    # errors stay JSON whatever was asked for
    resp = requests.get(gateway.url + "/data/market", params={"instrument_key": instrument, "timeframe": "daily"},
                        headers={"Authorization": f"Bearer {token}", "Accept": COLUMNS_MEDIA_TYPE}, timeout=10)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_timeframe"


def test_settled_windows_are_served_without_a_query_while_the_candle_feed_is_live(stack, data):
    """A window that ended long ago is proven by the feed; one ending near now is always counted; with
    the feed down every cached window is counted again, so a backfill shows on the very next read."""
    api = CountingQueries(stack)
    server = LocalServer(api.handle).start()
    try:
        instrument = data["instrument"]
        token = _token(data, as_of=T0 + 60 * 20)
        read = lambda **q: _get(server, "/data/market", token, instrument_key=instrument,  # noqa: E731
                                timeframe="1m", **q).json()["columns"]["time"]
        assert read(limit=3) == [T0 + 60 * i for i in (7, 8, 9)]
        assert wait_until(lambda: api.candle_feed.live)
        read(limit=3)  # built before the feed was listening: proven once by a count
        queries = api.queries
        assert read(limit=3) == [T0 + 60 * i for i in (7, 8, 9)]
        assert api.queries == queries  # settled and nothing announced since: no query at all
        recent = _token(data, as_of=time.time())
        for _ in range(2):
            _get(server, "/data/market", recent, instrument_key=instrument, timeframe="1m", limit=3)
        assert api.queries == queries + 2  # near now: built once, then proven by a count
        epoch = api._epoch
        with psycopg.connect(stack.pg_dsn, autocommit=True) as admin:  # the feed's connection dies
            assert admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                 " WHERE query LIKE 'LISTEN %%cs_candles%%' AND usename = %s",
                                 (stack.pg_reader_user,)).fetchall()
        assert wait_until(lambda: api._epoch != epoch)  # noticed: nothing proven before counts any more
        late = [CsvRow(datetime.fromtimestamp(T0 + 60 * 8 + 45, tz=UTC), "1", "2", "0.5", "1.5", "10")]
        with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
            assert load_rows(conn, instrument, "1m", late) == 1
        assert read(limit=3) == [T0 + 60 * 8, T0 + 60 * 8 + 45, T0 + 60 * 9]  # counted, rebuilt
        assert wait_until(lambda: api.candle_feed.live)  # the feed reconnects by itself
    finally:
        server.stop()


def test_metric_reads_never_pass_the_as_of_time(gateway, data):
    token = _token(data, as_of=T0 + 60 * 2)
    body = _get(gateway, "/data/metrics", token, instrument_key=data["instrument"], name="test.m").json()
    assert body["columns"] == {"time": [T0, T0 + 60, T0 + 120], "value": [0.0, 1.0, 2.0]}


def test_output_reads_never_pass_the_as_of_time(gateway, data):
    token = _token(data, as_of=T0 + 60 * 6 + 59)
    path = f"/data/scripts/{data['script']}"
    latest = _get(gateway, f"{path}/latest", token, instrument_key=data["instrument"], timeframe="1m").json()
    assert (latest["value"], latest["timestamp"], latest["metadata"]) == (6.0, T0 + 360, {"i": 6})
    hist = _get(gateway, f"{path}/history", token, instrument_key=data["instrument"], timeframe="1m").json()
    assert hist["columns"]["time"] == [T0 + 60 * i for i in range(7)]
    early = _token(data, as_of=T0 - 1)
    resp = _get(gateway, f"{path}/latest", early, instrument_key=data["instrument"], timeframe="1m")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "no_output"


# ------------------------------------------------------------------ tenants and closure


def test_a_tenant_never_reads_another_tenants_outputs(gateway, data):
    path = f"/data/scripts/{data['script']}/latest"
    key = {"instrument_key": data["instrument"], "timeframe": "1m"}
    a = _get(gateway, path, _token(data, tenant=data["ta"]), **key)
    b = _get(gateway, path, _token(data, tenant=data["tb"]), **key)
    assert (a.json()["value"], b.json()["value"]) == (4.0, 1004.0)
    other = _get(gateway, path, _token(data, tenant=f"tc-{data['uid']}"), instrument_key=data["instrument"],
                 timeframe="1m")
    assert other.status_code == 404  # same script id, no outputs in this tenant
    hist = _get(gateway, f"/data/scripts/{data['script']}/history", _token(data, tenant=data["tb"]),
                instrument_key=data["instrument"], timeframe="1m").json()
    assert all(v >= 1000 for v in hist["columns"]["value"])


def test_a_script_outside_the_dependency_closure_is_403(gateway, data):
    token = _token(data, deps=[])
    resp = _get(gateway, f"/data/scripts/{data['script']}/latest", token, instrument_key=data["instrument"],
                timeframe="1m")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_a_dependency"
    pinned_other_version = _token(data, deps=[f"{data['script']}@2"])
    resp = _get(gateway, f"/data/scripts/{data['script']}/latest", pinned_other_version,
                instrument_key=data["instrument"], timeframe="1m")
    assert resp.status_code == 404  # in the closure, but version 2 has no output


def test_params_select_the_output_series(gateway, data):
    token = _token(data)
    path = f"/data/scripts/{data['script']}/latest"
    ok = _get(gateway, path, token, instrument_key=data["instrument"], timeframe="1m", params="{}")
    assert ok.status_code == 200
    ok = _get(gateway, path, token, instrument_key=data["instrument"], timeframe="1m",
              params_hash=params_hash({}))
    assert ok.status_code == 200
    other = _get(gateway, path, token, instrument_key=data["instrument"], timeframe="1m", params='{"n": 3}')
    assert other.status_code == 404


# ------------------------------------------------------------------ authentication and validation


def test_expired_tampered_or_missing_tokens_are_401(gateway, data):
    expired = _token(data, ttl_s=5, now=time.time() - 60)
    header, payload, sig = _token(data).split(".")
    tampered = f"{header}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{sig}"
    for token in (expired, tampered, "garbage"):
        resp = _get(gateway, "/data/market", token, instrument_key=data["instrument"], timeframe="1m")
        assert resp.status_code == 401, token
        for path in ("/data/market", "/data/metrics"):  # the float64 form is behind the same check
            resp = requests.get(gateway.url + path, timeout=5, params={"instrument_key": data["instrument"],
                                                                       "timeframe": "1m", "name": "test.m"},
                                headers={"Authorization": f"Bearer {token}", "Accept": COLUMNS_MEDIA_TYPE})
            assert resp.status_code == 401 and resp.headers["Content-Type"] == "application/json", (path, token)
    resp = requests.get(gateway.url + "/data/market", params={"instrument_key": "X", "timeframe": "1m"},
                        timeout=5)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "missing_token"


@pytest.mark.parametrize(("params", "status"), [
    ({"timeframe": "1m"}, 400),
    ({"instrument_key": "../x", "timeframe": "1m"}, 422),
    ({"instrument_key": "X", "timeframe": "1minute"}, 422),
    ({"instrument_key": "X", "timeframe": "1m", "limit": "abc"}, 400),
    ({"instrument_key": "X", "timeframe": "1m", "limit": "0"}, 422),
    ({"instrument_key": "X", "timeframe": "1m", "limit": "100000"}, 422),
    ({"instrument_key": "X", "timeframe": "1m", "start": "yesterday"}, 400),
    ({"instrument_key": "X", "timeframe": "1m", "start": "nan"}, 422),
    ({"instrument_key": "X", "timeframe": "1m", "start": str(T0 + 1e6)}, 422),
    ({"instrument_key": "X", "timeframe": "1m", "colour": "red"}, 400),
])
def test_bad_parameters_get_a_clear_4xx(gateway, data, params, status):
    resp = _get(gateway, "/data/market", _token(data), **params)
    assert resp.status_code == status
    assert resp.json()["error"]["message"]


def test_bad_output_parameters(gateway, data):
    path = f"/data/scripts/{data['script']}/latest"
    base = {"instrument_key": data["instrument"], "timeframe": "1m"}
    assert _get(gateway, path, _token(data), **base, params="[1]").status_code == 422
    assert _get(gateway, path, _token(data), **base, params="{bad").status_code == 400
    assert _get(gateway, path, _token(data), **base, params_hash="ZZ").status_code == 422
    assert _get(gateway, "/data/scripts/Bad..Id/latest", _token(data), **base).status_code == 422


def test_unknown_instrument_is_an_empty_series(gateway, data):
    body = _get(gateway, "/data/market", _token(data), instrument_key=f"none{data['uid']}",
                timeframe="1m").json()
    assert body["columns"] == {k: [] for k in ("time", "end_time", "open", "high", "low", "close", "volume")}


def test_healthz(gateway):
    resp = requests.get(gateway.url + "/healthz", timeout=5)
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


# ------------------------------------------------------------------ rate limits


def _tiny(stack, rate_per_minute: int, burst: int):
    base = stack.tiers["pro"]
    tier = dataclasses.replace(base, name="tiny", rate_per_minute=rate_per_minute, burst=burst)
    return dataclasses.replace(stack, tiers={**stack.tiers, "tiny": tier})


def test_burst_gets_429_with_retry_after_and_recovers_when_the_clock_moves(stack, data):
    cfg = _tiny(stack, rate_per_minute=60, burst=2)  # one token a second
    clock = [1_000_000.0]
    server = LocalServer(GatewayApi(cfg, limiter=RateLimiter(cfg, clock=lambda: clock[0])).handle).start()
    try:
        token = _token(data, tier="tiny")
        params = {"instrument_key": data["instrument"], "timeframe": "1m", "limit": 1}
        assert [_get(server, "/data/market", token, **params).status_code for _ in range(2)] == [200, 200]
        over = _get(server, "/data/market", token, **params)
        assert over.status_code == 429 and over.headers["Retry-After"] == "1"
        assert over.json()["error"]["code"] == "rate_limited"
        clock[0] += 0.5
        assert _get(server, "/data/market", token, **params).status_code == 429  # half a token
        clock[0] += 0.5
        assert _get(server, "/data/market", token, **params).status_code == 200
        assert _get(server, "/data/market", token, **params).status_code == 429
    finally:
        server.stop()


class CountingQueries(GatewayApi):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queries = 0

    def _query(self, sql, args, binary=False):
        self.queries += 1
        return super()._query(sql, args, binary)


def test_refusals_come_first_and_callers_over_their_limit_cost_no_query(stack, data):
    """The limiter's round trip overlaps the read, yet a 429 answers before the route's own errors,
    and once refused a caller is checked before any work until its Retry-After has passed."""
    cfg = _tiny(stack, rate_per_minute=60, burst=2)
    clock = [2_000_000.0]
    api = CountingQueries(cfg, limiter=RateLimiter(cfg, clock=lambda: clock[0]))
    server = LocalServer(api.handle).start()
    try:
        token = _token(data, tier="tiny")
        params = {"instrument_key": data["instrument"], "timeframe": "1m", "limit": 1}
        assert [_get(server, "/data/market", token, **params).status_code for _ in range(2)] == [200, 200]
        bad = _get(server, "/data/market", token, **{**params, "timeframe": "daily"})
        assert bad.status_code == 429 and bad.json()["error"]["code"] == "rate_limited"  # not the 422
        before = api.queries
        for _ in range(5):
            assert _get(server, "/data/market", token, **params).status_code == 429
        assert api.queries == before  # refused up front: no query ran
        clock[0] += 1.0  # a token back
        # a window not read before, so the market-window cache cannot answer it without a query
        assert _get(server, "/data/market", token, **{**params, "limit": 3}).status_code == 200
        assert api.queries > before
    finally:
        server.stop()


def test_reads_survive_redis_forgetting_the_limiter_script(stack, data):
    """Redis does not persist loaded scripts: after SCRIPT FLUSH (as after a restart) reads go on."""
    api = GatewayApi(stack)
    server = LocalServer(api.handle).start()
    try:
        token = _token(data)
        params = {"instrument_key": data["instrument"], "timeframe": "1m", "limit": 2}
        assert _get(server, "/data/market", token, **params).status_code == 200
        api.limiter.redis.script_flush()
        assert _get(server, "/data/market", token, **params).json()["columns"]["time"] == [T0 + 120, T0 + 180]
        assert _get(server, "/data/market", token, **params).status_code == 200
    finally:
        server.stop()


def test_an_unreachable_rate_limiter_fails_closed_with_503(stack, data):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    server = LocalServer(GatewayApi(stack, limiter=RateLimiter(stack, client=dead)).handle).start()
    try:
        resp = _get(server, "/data/market", _token(data), instrument_key=data["instrument"], timeframe="1m")
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert resp.json()["error"]["code"] == "ratelimit_unavailable"
    finally:
        server.stop()


def test_the_per_script_bucket_caps_many_users_of_one_script(stack, uid):
    cfg = _tiny(stack, rate_per_minute=60, burst=1)  # script bucket: 10x the user bucket
    limiter = RateLimiter(cfg, clock=lambda: 5_000_000.0)

    def allowed(user: str, script: str) -> bool:
        return limiter.check(tenant=f"t-{uid}", user=user, script_id=script, tier_name="tiny").allowed

    assert [allowed(f"user{i}", f"s-{uid}") for i in range(11)] == [True] * 10 + [False]
    assert allowed("user0", f"other-{uid}") is False  # user0's own bucket is empty
    assert allowed("fresh", f"other-{uid}") is True


def test_limit_recovers_with_the_real_clock(stack, data):
    cfg = _tiny(stack, rate_per_minute=60, burst=1)
    server = LocalServer(GatewayApi(cfg).handle).start()
    try:
        token = _token(data, tier="tiny")
        params = {"instrument_key": data["instrument"], "timeframe": "1m", "limit": 1}
        statuses = [_get(server, "/data/market", token, **params).status_code for _ in range(3)]
        assert statuses[0] == 200 and 429 in statuses
        deadline = time.monotonic() + 30  # a bound for a hung stack, not a timing assertion
        while (resp := _get(server, "/data/market", token, **params)).status_code == 429:
            assert time.monotonic() < deadline, "rate limit never recovered"
            time.sleep(min(float(resp.headers["Retry-After"]), 0.2))
        assert resp.status_code == 200
    finally:
        server.stop()
