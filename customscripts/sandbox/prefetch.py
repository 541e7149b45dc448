"""Prefetched reads: data the scheduler already holds, answered in the supervisor instead of gateway-fn.

Why: a realtime batch reads the same candle windows and the dependency outputs the scheduler has just
published; asking gateway-fn for each of them (child -> supervisor -> HTTP -> provider -> gateway-fn)
costs milliseconds per item. The scheduler sends them along with the batch, and the supervisor answers
a read from them only when the answer is *provably* what gateway-fn would return for that item's
execution token; anything else (not covered, other instrument, other as-of, transitive dependency...)
still goes to gateway-fn. Nothing here can widen what a script reads:

* market windows are contiguous runs of candles ending at or before `hi` (a bar is visible at its
  end: reads compare the `end_time` column, like the gateway); a read is answered only for the item's
  own instrument and timeframe (the series its evaluation was scheduled for - so a per-instrument
  entitlement in the gateway could never be bypassed through another item's window), and only if its
  as-of-clamped window lies inside (the supervisor clamps `end` to the item's timestamp itself, exactly
  like the gateway clamps to the token's as-of; times are compared in microseconds like PostgreSQL);
* dependency outputs carry the event time they belong to and are used only for an item whose
  timestamp is that time, only for the dependency's default params, and only for scripts listed in
  this function's own `depends_on` (checked by the handler against meta.json);
* the handler accepts a prefetch only under a MAC made with the invocation secret over the function,
  the batch's items and the prefetch bytes (`invocation.verify_prefetch`), and only for the tenant
  of the invocation token.

Wire (`data`, a JSON string): {"v": 1, "tenant": str, "market": [{"instrument_key", "timeframe",
"hi", "complete", "n", "cols": base64(float64 x 7n: time, end_time, open, high, low, close, volume)}],
"outputs": [{"script_id", "version", "instrument_key", "timeframe", "params_hash", "time", "value",
"timestamp", "metadata"}]}. Runs in the trusted supervisor only (never inside the sandbox).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any, NamedTuple

from . import protocol
from .windows import CANDLE_COLUMNS, MAX_FAST_TIME, epoch_us, window_rows

WIRE_VERSION = 2  # 2: windows carry each bar's end, and a bar is visible at its end (bartime.py)
MAX_TIME_ABS = 1e11  # the gateway's range for time parameters


def params_hash(params: dict[str, Any] | None) -> str:
    """customscripts.outputs.params_hash, repeated here: the function image has no database driver."""
    canonical = json.dumps(params or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class PrefetchError(ValueError):
    """A malformed prefetch: the handler rejects the whole request (only the platform sends one)."""


class _Window:
    """One candle window, decoded on its first read (most requests read a window several times, some
    never): the handler only checks the envelope, the read path the rows."""

    __slots__ = ("complete", "ends", "hi", "hi_us", "instrument_key", "n", "raw", "timeframe", "view")

    def __init__(self, raw: dict) -> None:
        try:
            self.instrument_key = str(raw["instrument_key"])
            self.timeframe = str(raw["timeframe"])
            self.hi = float(raw["hi"])
            self.complete = raw["complete"] is True
            self.n = int(raw["n"])
            self.raw = raw["cols"]
        except (KeyError, TypeError, ValueError) as exc:
            raise PrefetchError(f"invalid market window: {exc}") from None
        if not isinstance(self.raw, str) or not math.isfinite(self.hi) or not 0 <= self.n <= 1_000_000 \
                or abs(self.hi) >= MAX_FAST_TIME:
            raise PrefetchError("invalid market window bounds")
        self.hi_us = epoch_us(self.hi)
        self.ends: array | None = None
        self.view: memoryview | None = None

    def _decode(self) -> tuple[array, memoryview] | None:
        """(the bars' ends, the raw columns), or None when the window is not well formed."""
        if self.ends is None:
            try:
                blob = base64.b64decode(self.raw, validate=True)
            except (binascii.Error, ValueError):
                return None
            if len(blob) != 8 * len(CANDLE_COLUMNS) * self.n:
                return None
            starts, ends = array("d"), array("d")
            starts.frombytes(blob[: 8 * self.n])
            ends.frombytes(blob[8 * self.n: 16 * self.n])
            prev = -math.inf
            for start, end in zip(starts, ends, strict=True):  # increasing, finite, not after the as-of
                if not (prev < end < MAX_FAST_TIME and start < end):
                    return None
                prev = end
            if self.n and epoch_us(ends[-1]) > self.hi_us:
                return None
            self.ends, self.view = ends, memoryview(blob)
        return self.ends, self.view  # type: ignore[return-value]

    def columns(self, lo: int, hi: int) -> bytes:
        """Rows [lo, hi) as float64 columns, one after another (CANDLE_COLUMNS)."""
        assert self.view is not None
        n, view = self.n, self.view
        return b"".join(view[8 * (c * n + lo): 8 * (c * n + hi)] for c in range(len(CANDLE_COLUMNS)))

    def frame(self, lo: int, hi: int, head: dict) -> bytes:
        """Rows [lo, hi) as the binary reply the supervisor would build from the gateway's columns."""
        spec = [[name, hi - lo] for name in CANDLE_COLUMNS]
        return protocol.binary_frame({"ok": head, "f64": spec}, self.columns(lo, hi))


class Handover(NamedTuple):
    """What the child may answer by itself for the items of one event: the `data` frame (see
    `Prefetched.handover`) and the most rows of a window in it (what the child can claim to have read)."""

    frame: bytes
    rows: int


class Prefetched:
    """The prefetch of one request, indexed for the supervisor's read path."""

    def __init__(self, windows: Iterable[_Window] = (), outputs: Iterable[dict] = ()) -> None:
        self.windows = {(w.instrument_key, w.timeframe): w for w in windows}
        self.outputs: dict[tuple[str, str, str, str, int], dict] = {}
        for o in outputs:
            self.outputs[(o["script_id"], o["instrument_key"], o["timeframe"], o["params_hash"],
                          epoch_us(o["time"]))] = {"value": o["value"], "timestamp": o["timestamp"],
                                                   "metadata": o["metadata"]}
        self.hits = 0  # reads answered here or by the child from a handover (observability, tests)
        self.bars = 0  # the most candles before an item's as-of one market read needed (window sizing)
        self._default_hash = params_hash(None)

    @classmethod
    def parse(cls, data: str, *, tenant: str, dependencies: Iterable[str]) -> Prefetched:
        """Decode and check a prefetch; outputs of anything but this function's direct dependencies
        (`script_id@version` from its meta.json) or of another tenant are refused."""
        try:
            body = json.loads(data)
        except (TypeError, ValueError) as exc:
            raise PrefetchError(f"prefetch is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("v") != WIRE_VERSION:
            raise PrefetchError("unknown prefetch version")
        if body.get("tenant") != tenant:
            raise PrefetchError("prefetch for another tenant")
        market, outputs = body.get("market") or [], body.get("outputs") or []
        if not isinstance(market, list) or not isinstance(outputs, list):
            raise PrefetchError("prefetch market/outputs must be lists")
        windows = [_Window(w) for w in market if isinstance(w, dict)]
        allowed = set(dependencies)
        checked: list[dict] = []
        seen: set[tuple] = set()
        for o in outputs:
            if not isinstance(o, dict):
                raise PrefetchError("invalid prefetched output")
            try:
                ref = f"{o['script_id']}@{int(o['version'])}"
                fields = (o["instrument_key"], o["timeframe"], o["params_hash"], o["script_id"])
                t, ts = float(o["time"]), float(o["timestamp"])
                meta = o["metadata"]
                if "value" not in o:
                    raise KeyError("value")
            except (KeyError, TypeError, ValueError) as exc:
                raise PrefetchError(f"invalid prefetched output: {exc}") from None
            if not all(isinstance(f, str) for f in fields) or not isinstance(meta, dict) or \
                    not all(math.isfinite(x) and abs(x) <= MAX_TIME_ABS for x in (t, ts)):
                raise PrefetchError("invalid prefetched output fields")
            if epoch_us(ts) != epoch_us(t):
                raise PrefetchError("a prefetched output's timestamp must be its event time")
            if ref not in allowed:
                raise PrefetchError(f"prefetched output of {ref}, which is not a dependency of this script")
            key = (o["script_id"], o["instrument_key"], o["timeframe"], o["params_hash"], epoch_us(t))
            if key in seen:
                raise PrefetchError("two prefetched outputs for one read")
            seen.add(key)
            checked.append(o)
        if len({(w.instrument_key, w.timeframe) for w in windows}) != len(windows):
            raise PrefetchError("two prefetched windows for one instrument and timeframe")
        return cls(windows, checked)

    # ------------------------------------------------------------------ answers

    def market_frame(self, instrument_key: str, timeframe: str, *, limit: int, start: float | None,
                     end: float, as_of: float) -> bytes | None:
        """The reply frame to a market read with `end` already clamped to the item's as-of, or None
        when the prefetched window does not certainly hold the gateway's answer."""
        w = self.windows.get((instrument_key, timeframe))
        if w is None:
            return None
        decoded = w._decode()
        if decoded is None:
            return None
        rows, needed = window_rows(decoded[0], w.n, w.complete, w.hi_us, limit=limit, start=start, end=end,
                                   as_of=as_of)
        self.bars = max(self.bars, needed)
        if rows is None:
            return None
        self.hits += 1
        return w.frame(rows[0], rows[1], {"instrument_key": instrument_key, "timeframe": timeframe, "as_of": as_of})

    def handover(self, series: Iterable[tuple[str, str]], as_of: float) -> Handover:
        """The part of this prefetch the child may hold while it runs the items of one event (`as_of`) on
        `series`, their own instruments and timeframes: each series' window cut at the as-of (its last
        `bars` candles there once reads have shown how many they need; a read needing more asks the
        supervisor, which answers from the whole window and grows `bars`), and the dependency outputs
        of that event with default params on those series (possibly nothing). The supervisor sends it
        only when the child starts the first of those items, so nothing after an item's as-of, and
        nothing of a series no item of the event runs on, is ever in the child.

        Frame (binary, supervisor -> child): head {"op": "data", "as_of", "windows": [[instrument_key,
        timeframe, n, complete], ...], "outputs": [[script_id, instrument_key, timeframe, JSON text of
        {"value", "timestamp", "metadata"}], ...]} + each window's n rows as float64 columns
        (CANDLE_COLUMNS), window after window. The child answers from it with `windows.window_rows`, the
        rule the supervisor's own answers follow."""
        wanted = set(series)
        try:
            as_of_us = epoch_us(as_of)
        except (ValueError, OverflowError, OSError):
            wanted, as_of, as_of_us = set(), 0.0, 0  # out of range: nothing handed over, all reads go as before
        heads: list[list[Any]] = []
        blobs: list[bytes] = []
        rows = 0
        for key in sorted(wanted):
            w = self.windows.get(key)
            if w is None or as_of_us > w.hi_us:
                continue  # candles after the window's as-of may exist: those reads go to the supervisor
            decoded = w._decode()
            if decoded is None:
                continue
            k = bisect_right(decoded[0], as_of_us / 1_000_000)
            lo = max(0, k - self.bars) if self.bars else 0  # the last candles the reads needed so far
            heads.append([key[0], key[1], k - lo, w.complete and lo == 0])
            blobs.append(w.columns(lo, k))
            rows = max(rows, k - lo)
        outputs = [[sid, key, tf, json.dumps(hit)] for (sid, key, tf, ph, t_us), hit in self.outputs.items()
                   if t_us == as_of_us and ph == self._default_hash and (key, tf) in wanted]
        head = {"op": "data", "as_of": as_of, "windows": heads, "outputs": outputs}
        return Handover(protocol.binary_frame(head, b"".join(blobs)), rows)

    def script_output(self, script_id: str, instrument_key: str, timeframe: str, params_hash: str,
                      as_of: float) -> dict | None:
        """The dependency's output for this event (latest at or before as-of), or None."""
        hit = self.outputs.get((script_id, instrument_key, timeframe, params_hash, epoch_us(as_of)))
        if hit is not None:
            self.hits += 1
        return hit
