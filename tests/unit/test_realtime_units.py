from __future__ import annotations

import json

import pytest

from customscripts.errors import Unprocessable
from customscripts.gateway.tokens import mint_execution_token, verify_execution_token
from customscripts.realtime.scheduler import Event, latency_summary, parse_event, timeframe_seconds


def test_candle_close_and_timer_events_parse():
    candle = {"instrument_key": "GOOG", "timeframe": "1d", "time": 1357084800.0, "close": 1.0}
    assert parse_event("market.candle.GOOG.1d", json.dumps(candle).encode()) == [Event("GOOG", "1d", 1357084800.0)]
    tick = parse_event("market.candle._timer.1m", json.dumps({"timer": True, "timeframe": "1m", "time": 60}).encode())
    assert tick == [Event("", "1m", 60.0)]


@pytest.mark.parametrize("body", [b"[]", b'{"instrument_key": "../x", "timeframe": "1d", "time": 1}',
                                  b'{"instrument_key": "GOOG", "timeframe": "1d", "time": "NaN"}'])
def test_malformed_events_are_rejected(body):
    with pytest.raises((ValueError, Unprocessable, KeyError)):
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
