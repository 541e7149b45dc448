"""The child's side of a handover (prefetch.Prefetched.handover): the reads of the running item that
the event's handed-over data certainly answers, answered without a round trip to the supervisor.

Why a module of its own: it is the one place where the child answers reads, and it must answer them
exactly as the supervisor would (same window rule, windows.window_rows; same argument checks as
reads.parse_read, else the read goes over the socket). Runs inside the sandbox: stdlib + numpy.
"""

from __future__ import annotations

import json
from typing import Any

from .windows import CANDLE_COLUMNS, epoch_us, read_limit, read_text, read_time, window_rows


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
        try:
            key, tf = read_text(instrument_key or own_key, 64), read_text(timeframe or own_tf, 16)
            if key != own_key or tf != own_tf or (key, tf) not in self.windows:
                return None  # only the item's own series was handed over
            n, complete, raw = self.windows[(key, tf)]
            end_s = read_time(end)
            end_s = as_of if end_s is None else min(end_s, as_of)
            rows, needed = window_rows(raw[8 * n:16 * n].cast("d"), n, complete, self.as_of_us,
                                       limit=read_limit(limit), start=read_time(start), end=end_s, as_of=as_of)
        except (ValueError, OverflowError, OSError):
            return None  # the supervisor answers (or refuses) it
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
            text = self.outputs.get((read_text(script_id, 128), read_text(instrument_key or own_key, 64),
                                     read_text(timeframe or own_tf, 16)))
        except (ValueError, OverflowError, OSError):
            return None  # the supervisor answers (or refuses) it
        if text is None:
            return None
        self.hits += 1
        return json.loads(text)
