"""The as-of rule: a bar is visible at its end; calendar timeframes end where the calendar says."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from customscripts.bartime import (
    bar_end,
    bar_end_dt,
    fixed_seconds,
    is_calendar,
    last_close,
    parse_timeframe,
    visible,
)


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("start", "timeframe", "end"), [
    (ts(2012, 6, 1), "1d", ts(2012, 6, 2)),
    (ts(2017, 4, 19, 9), "1h", ts(2017, 4, 19, 10)),
    (ts(2017, 4, 19, 9, 15), "15m", ts(2017, 4, 19, 9, 30)),
    (ts(2017, 4, 19, 9, 15, 30), "30s", ts(2017, 4, 19, 9, 16)),
    (ts(2012, 1, 1), "1mo", ts(2012, 2, 1)),
    (ts(2012, 1, 31), "1mo", ts(2012, 2, 1)),  # labelled at its month's end (the BTCUSD sample)
    (ts(2012, 2, 29), "1mo", ts(2012, 3, 1)),
    (ts(2012, 12, 31), "1mo", ts(2013, 1, 1)),
    (ts(2012, 11, 1), "3mo", ts(2013, 2, 1)),
    (ts(2024, 1, 1), "1w", ts(2024, 1, 8)),  # a Monday
    (ts(2024, 1, 7, 23), "1w", ts(2024, 1, 8)),  # Sunday: the week it belongs to ends on Monday
    (ts(2024, 1, 3), "2w", ts(2024, 1, 15)),
])
def test_bar_end(start: float, timeframe: str, end: float) -> None:
    assert bar_end(start, timeframe) == end
    assert bar_end_dt(datetime.fromtimestamp(start, tz=UTC), timeframe).timestamp() == end
    assert visible(start, timeframe, end) and not visible(start, timeframe, end - 1e-6)
    assert not visible(start, timeframe, start)  # never at its own start: that was the look-ahead


def test_timeframe_kinds() -> None:
    assert fixed_seconds("4h") == 14400 and fixed_seconds("1mo") is None
    assert is_calendar("1w") and is_calendar("12mo") and not is_calendar("1d")
    assert parse_timeframe("15m") == (15, "m")
    for bad in ("0d", "1y", "d", "", "1.5h", None):
        with pytest.raises(ValueError):
            parse_timeframe(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("now", "timeframe", "tick"), [
    (ts(2024, 1, 10, 13, 7, 5), "1m", ts(2024, 1, 10, 13, 7)),
    (ts(2024, 1, 10, 13, 7, 5), "4h", ts(2024, 1, 10, 12)),
    (ts(2024, 1, 10, 13, 7, 5), "1d", ts(2024, 1, 10)),
    (ts(2024, 1, 10, 13, 7, 5), "1w", ts(2024, 1, 8)),  # a Wednesday: the week closed on Monday
    (ts(2024, 1, 8), "1w", ts(2024, 1, 8)),
    (ts(2024, 2, 29, 23), "1mo", ts(2024, 2, 1)),
    (ts(2024, 5, 2), "3mo", ts(2024, 4, 1)),
])
def test_timer_ticks_fire_at_bar_ends(now: float, timeframe: str, tick: float) -> None:
    assert last_close(now, timeframe) == tick
    start = tick - 1 if fixed_seconds(timeframe) else tick - 86400 * 2  # inside the bar that closed at the tick
    assert last_close(now, timeframe) <= now and bar_end(start, timeframe) >= tick
