"""Candle-window arithmetic shared by the supervisor and the child: which rows of a prefetched window
answer a market read exactly as gateway-fn would.

Why one function for both sides: the supervisor answers reads from the scheduler's prefetch
(prefetch.py), and the child answers its own item's reads from the part of it the supervisor hands
over for the item's event (handover.py, `SegmentData`); the two must never disagree with each other or
with the gateway. Rules (the gateway's): a bar is visible at its end, times compare in microseconds
like PostgreSQL's timestamptz, `end` is already clamped to the item's as-of.

This module runs inside the sandbox too: stdlib only.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

CANDLE_COLUMNS = ("time", "end_time", "open", "high", "low", "close", "volume")  # gateway-fn's columns
# below 2**32 s (year 2106) distinct microseconds are distinct float64s, so comparing floats rounded to
# microseconds is comparing PostgreSQL timestamps; beyond it the read goes to the gateway
MAX_FAST_TIME = float(2**32)
MAX_NEEDED = 1_000_000  # the most candles a read is ever reported to need (window sizing)
MAX_MARKET_LIMIT = 5000
DEFAULT_LIMIT = 200
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def epoch_us(value: float) -> int:
    """Epoch seconds -> integer microseconds, rounded exactly as the gateway's datetime conversion
    (`datetime.fromtimestamp`) and PostgreSQL's timestamptz compare them."""
    return (datetime.fromtimestamp(value, tz=UTC) - _EPOCH) // _US


def window_rows(ends: Sequence[float], n: int, complete: bool, hi_us: int, *, limit: int, start: float | None,
                end: float, as_of: float) -> tuple[tuple[int, int] | None, int]:
    """(rows [lo, hi) of the window that are the gateway's answer, or None when the window does not
    certainly hold it; how many candles before the as-of the read needed, for sizing the next windows,
    0 when unknown). `ends`: the window's bars' ends, increasing, all at or before `hi_us`, the last `n`
    candles of the series (all of them when `complete`). Out-of-range times raise ValueError or
    OverflowError (then the read goes to the gateway)."""
    for x in (end, start):
        if x is not None and not (math.isfinite(x) and abs(x) < MAX_FAST_TIME):
            return None, 0  # out of the fast range, or the gateway rejects it: let it answer
    end_us = epoch_us(end)
    if end_us > hi_us:
        return None, 0  # rows after the window's as-of may exist
    idx = bisect_right(ends, end_us / 1_000_000)  # the float the gateway's timestamp compare means
    after = bisect_right(ends, epoch_us(as_of) / 1_000_000) - idx  # candles between end and as-of
    if start is None:
        needed = min(limit + after, MAX_NEEDED)
        if idx < limit and not complete:
            return None, needed
        return (max(0, idx - limit), idx), needed
    start_us = epoch_us(start)
    if start_us > end_us:
        return None, 0  # the gateway answers 422
    lo = bisect_left(ends, start_us / 1_000_000)
    if lo == 0 and not complete and (not n or start_us < epoch_us(ends[0])):
        return None, 2 * n + 1  # rows before the window may be in the range: how many is unknown
    return (lo, max(lo, min(lo + limit, idx))), idx + after - lo


# A read call's arguments, checked the same way wherever it is answered (supervisor: reads.parse_read;
# child: handover.SegmentData, which sends anything these refuse over the socket for the error).

def read_text(value: object, maxlen: int) -> str:
    if not isinstance(value, str) or not value or len(value) > maxlen:
        raise ValueError("expected a non-empty string")
    return value


def read_time(value: object) -> float | None:
    """A finite float or None: NaN or an infinity would defeat every comparison and clamp after it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    number = float(value)  # OverflowError for an int beyond float: an invalid read call too
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def read_limit(value: object) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("limit must be a positive integer")
    return min(value, MAX_MARKET_LIMIT)
