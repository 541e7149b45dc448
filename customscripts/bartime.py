"""When a bar exists: the one as-of rule of the platform (LEAN's Time / EndTime convention).

A bar labelled `time` (its start) covers [start, end) and its close is known only at its end, so it
is visible as of T only when `bar_end(start, timeframe) <= T`. Every read path (gateway-fn, the
scheduler's and the supervisor's prefetched windows, the sample data source, the replayer) compares
bar ends, a candle-close event's `ctx.timestamp` is the bar's end, and outputs and derived metrics
are stamped with it. Reading the start instead is look-ahead: a daily bar would be seen with its close
at its own midnight.

Fixed timeframes (`s`, `m`, `h`, `d`) end `n` units after the start. Calendar timeframes end where
the calendar says: `Nw` at the Monday 00:00 UTC `n` weeks after the Monday of the bar's week, `Nmo` on
the 1st 00:00 UTC `n` months after the 1st of the bar's month. So a monthly bar labelled at its
month's end (as pandas labels them, e.g. the BTCUSD sample's 2012-01-31) ends 2012-02-01 like one
labelled 2012-01-01. PostgreSQL's `cs_bar_end(time, timeframe)` (migration 010) is this function in
SQL: it fills `candles.end_time` on every insert, and tests/unit/test_bartime.py holds the two equal.

Pure standard library: the script function's supervisor and the sample data source use it too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_TIMEFRAME = re.compile(r"([0-9]{1,4})(s|m|h|d|w|mo)\Z")
_FIXED_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FIRST_MONDAY = datetime(1970, 1, 5, tzinfo=UTC)  # the grid of multi-week timeframes


def parse_timeframe(timeframe: str) -> tuple[int, str]:
    """("15m") -> (15, "m"); ValueError for anything that is not a timeframe with a positive count."""
    found = _TIMEFRAME.match(timeframe) if isinstance(timeframe, str) else None
    if found is None or int(found.group(1)) < 1:
        raise ValueError(f"invalid timeframe: {timeframe!r}")
    return int(found.group(1)), found.group(2)


def is_calendar(timeframe: str) -> bool:
    """Weeks and months: their length depends on where they start."""
    return parse_timeframe(timeframe)[1] in ("w", "mo")


def fixed_seconds(timeframe: str) -> int | None:
    """A fixed timeframe's length in seconds; None for calendar timeframes."""
    n, unit = parse_timeframe(timeframe)
    return n * _FIXED_S[unit] if unit in _FIXED_S else None


def bar_end_dt(start: datetime, timeframe: str) -> datetime:
    """The bar's end as an aware UTC datetime (naive starts are UTC)."""
    start = start if start.tzinfo else start.replace(tzinfo=UTC)
    n, unit = parse_timeframe(timeframe)
    if unit in _FIXED_S:
        return start + timedelta(seconds=n * _FIXED_S[unit])
    day = start.astimezone(UTC)
    if unit == "w":
        monday = datetime(day.year, day.month, day.day, tzinfo=UTC) - timedelta(days=day.weekday())
        return monday + timedelta(weeks=n)
    months = day.year * 12 + day.month - 1 + n
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC)


def bar_end(start: float, timeframe: str) -> float:
    """The bar's end in epoch seconds: the time its close becomes known and its event happens."""
    seconds = fixed_seconds(timeframe)
    if seconds is not None:
        return float(start) + seconds
    return bar_end_dt(datetime.fromtimestamp(start, tz=UTC), timeframe).timestamp()


def last_close(now: float, timeframe: str) -> float:
    """The latest bar end at or before `now` on the timeframe's grid (fixed timeframes from the
    epoch; weeks from Mondays, months from the 1st): when the scheduler's timer ticks fire."""
    seconds = fixed_seconds(timeframe)
    if seconds is not None:
        return float(now // seconds * seconds)
    n, unit = parse_timeframe(timeframe)
    day = datetime.fromtimestamp(now, tz=UTC)
    if unit == "w":
        monday = datetime(day.year, day.month, day.day, tzinfo=UTC) - timedelta(days=day.weekday())
        weeks = (monday - _FIRST_MONDAY).days // 7
        return (_FIRST_MONDAY + timedelta(weeks=weeks - weeks % n)).timestamp()
    months = day.year * 12 + day.month - 1
    months -= months % n
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC).timestamp()


def visible(start: float, timeframe: str, as_of: float) -> bool:
    """Whether the bar starting at `start` may be read as of `as_of` (its end is not after it)."""
    return bar_end(start, timeframe) <= as_of
