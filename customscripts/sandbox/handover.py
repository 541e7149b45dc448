"""The child's side of a handover (prefetch.Prefetched.handover): the reads of the running item that
the event's handed-over data certainly answers, answered without a round trip to the supervisor.

Why a module of its own: it is the one place where the child answers reads, and it must answer them
exactly as the supervisor would (same window rule, windows.window_rows; same argument checks as
reads.parse_read, else the read goes over the socket). Runs inside the sandbox: stdlib + numpy.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .windows import CANDLE_COLUMNS, epoch_us, window_rows

MAX_MARKET_LIMIT = 5000  # reads.MAX_MARKET_LIMIT: the supervisor caps a read's limit the same way


def _text(value: Any, maxlen: int) -> str | None:
    """The string the supervisor's read-call check would accept (reads._s), else None."""
    return value if type(value) is str and 0 < len(value) <= maxlen else None


def _time(value: Any) -> float | None:
    """A read's start/end as the supervisor's check would take it (reads._num); ValueError if it would
    refuse it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


class SegmentData:
    """What the supervisor handed over for the items of one event (prefetch.Prefetched.handover): the
    items' own candle windows cut at the event's time and its dependency outputs. The child answers
    the reads these certainly hold itself, with the rule the supervisor uses (windows.window_rows);
    every other read, and every call argument the supervisor would refuse, still goes over the socket,
    so a script sees exactly the same answers and errors either way."""

    def __init__(self, head: dict, blob: memoryview) -> None:
        self.as_of_us = epoch_us(float(head["as_of"]))
        self.windows: dict[tuple[str, str], tuple[int, bool, memoryview]] = {}
        width = 8 * len(CANDLE_COLUMNS)
        off = 0
        for key, tf, n, complete in head.get("windows") or ():
            self.windows[(key, tf)] = (n, complete is True, blob[off:off + width * n])
            off += width * n
        self.outputs = {(sid, key, tf): text for sid, key, tf, text in head.get("outputs") or ()}
        self.hits = 0  # per item: reads answered here, and the most candles one needed (window sizing)
        self.bars = 0

    def market(self, own_key: str, own_tf: str, as_of: float, instrument_key: Any, timeframe: Any, limit: Any,
               start: Any, end: Any) -> tuple[dict, dict] | None:
        """(payload, columns) for `Bars`, answering the running item's read (its own series `own_key`,
        `own_tf`, as of `as_of`), or None: then the read goes to the supervisor."""
        key, tf = _text(instrument_key or own_key, 64), _text(timeframe or own_tf, 16)
        if key != own_key or tf != own_tf:
            return None  # only the item's own series was handed over
        window = self.windows.get((key, tf))
        if window is None:
            return None
        if limit is None:
            limit = 200
        if type(limit) is not int or limit < 1:
            return None
        n, complete, raw = window
        try:
            start_s, end_s = _time(start), _time(end)
            end_s = as_of if end_s is None else min(end_s, as_of)
            rows, needed = window_rows(raw[8 * n:16 * n].cast("d"), n, complete, self.as_of_us,
                                       limit=min(limit, MAX_MARKET_LIMIT), start=start_s, end=end_s, as_of=as_of)
        except (ValueError, OverflowError, OSError):
            return None
        self.bars = max(self.bars, needed)
        if rows is None:
            return None
        import numpy as np

        lo, hi = rows
        table = np.frombuffer(raw, dtype=np.float64, count=len(CANDLE_COLUMNS) * n).reshape(
            len(CANDLE_COLUMNS), n)[:, lo:hi].copy()
        self.hits += 1
        return {"instrument_key": key, "timeframe": tf}, {name: table[i] for i, name in enumerate(CANDLE_COLUMNS)}

    def script_output(self, own_key: str, own_tf: str, as_of: float, script_id: Any, instrument_key: Any,
                      timeframe: Any, params: Any, history: Any) -> Any:
        """The dependency's output for this event as the supervisor would answer it, or None."""
        if history is not None or not (params is None or (type(params) is dict and not params)):
            return None  # the handover holds default-params outputs of this event only
        try:
            if epoch_us(as_of) != self.as_of_us:
                return None  # an output of this event is not "latest" for a later one
        except (ValueError, OverflowError, OSError):
            return None
        sid = _text(script_id, 128)
        key, tf = _text(instrument_key or own_key, 64), _text(timeframe or own_tf, 16)
        text = self.outputs.get((sid, key, tf)) if sid and key and tf else None
        if text is None:
            return None
        self.hits += 1
        return json.loads(text)
