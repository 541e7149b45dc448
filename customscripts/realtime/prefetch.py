"""What the scheduler sends along with a batch so script functions need not ask gateway-fn.

Why: in a realtime batch most reads are the candle window of the event's own instrument and the
outputs of dependencies the scheduler published a wave earlier; through gateway-fn each costs a few
milliseconds (child -> supervisor -> HTTP -> provider -> gateway-fn -> PostgreSQL). Here the candle
windows of a whole batch come from ONE query (a lateral join over every instrument of the batch, with
the gateway's read-only role), and dependency outputs come from the rows just published.

Exactly what gateway-fn would return, never more (the function's supervisor re-checks coverage and
the as-of clamp per read, see customscripts/sandbox/prefetch.py):
* a window holds the last `bars + events` candles ending at or before the latest event of its
  instrument in the batch (a bar is visible at its end, customscripts/bartime.py), with the
  gateway's own SQL expressions (bit-identical floats); market data is not tenant-scoped, and every
  item's token may read its own instrument. `bars` is learnt per script
  version: its functions report how many candles its reads needed (DEFAULT_BARS until they have);
  a window that turns out too short only sends those reads to the gateway;
* an output is offered only to items of the same tenant whose version *directly* depends on it,
  only when exactly one version of that script is in the item's closure (the gateway would otherwise
  pick among versions), only for this event, and only if this batch's history insert wrote it (a
  redelivered event may find an older row; then the read goes to the gateway); its value and metadata
  are normalised the way a jsonb round trip returns them (key order, integral exponent floats), and
  an output whose JSON that cannot mirror is not offered.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from array import array
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from psycopg_pool import ConnectionPool

from customscripts.outputs import OutputRow
from customscripts.sandbox.prefetch import WIRE_VERSION
from customscripts.sandbox.windows import CANDLE_COLUMNS, epoch_us

_WIRE_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

DEFAULT_BARS = 200  # the read APIs' default limit: sent until a version's functions report what it reads
MAX_BARS = 2000  # never more per window, whatever a script reads (beyond it reads go to the gateway)

# float8send: each value as 8 big-endian bytes, so a window arrives as one bytea (rows of time, end_time,
# open, high, low, close, volume; one sort per window; bars visible as of `hi` by their end, bartime.py)
# and Python never makes a float object of it - the gateway's expressions, so the same float64 bits
_WINDOWS_SQL = """
SELECT k.i, k.tf, k.n, w.cnt, w.rows
FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::int[]) AS k(i, tf, hi, n)
CROSS JOIN LATERAL (
    SELECT count(*) AS cnt,
           string_agg(float8send(extract(epoch FROM time)::float8)
                      || float8send(extract(epoch FROM end_time)::float8) || float8send(open) || float8send(high)
                      || float8send(low) || float8send(close) || float8send(volume), '' ORDER BY end_time) AS rows
    FROM (SELECT time, end_time, open, high, low, close, volume FROM candles
          WHERE instrument_key = k.i AND timeframe = k.tf AND end_time <= k.hi
          ORDER BY end_time DESC LIMIT k.n) r
) w
"""


class Window:
    """One candle window (column-major float64: CANDLE_COLUMNS), of the bars ending at or before `hi`."""

    __slots__ = ("_json", "cols", "complete", "hi", "instrument_key", "n", "timeframe")

    def __init__(self, instrument_key: str, timeframe: str, hi: float, n: int, complete: bool, cols: bytes) -> None:
        self.instrument_key, self.timeframe, self.hi = instrument_key, timeframe, hi
        self.n, self.complete, self.cols = n, complete, cols
        self._json: str | None = None  # the wire form as JSON text, made once: a batch's functions share it

    def last(self, m: int) -> Window:
        """The newest m candles (all if fewer): complete only if nothing was cut off a complete window."""
        if m >= self.n:
            return self
        view, n = memoryview(self.cols), self.n
        cols = b"".join(view[8 * (c * n + n - m): 8 * (c * n + n)] for c in range(len(CANDLE_COLUMNS)))
        return Window(self.instrument_key, self.timeframe, self.hi, m, False, cols)

    def wire(self) -> dict[str, Any]:
        return {"instrument_key": self.instrument_key, "timeframe": self.timeframe, "hi": self.hi,
                "complete": self.complete, "n": self.n, "cols": base64.b64encode(self.cols).decode()}

    def wire_json(self) -> str:
        if self._json is None:
            self._json = _WIRE_JSON.encode(self.wire())
        return self._json


class MarketWindows:
    """Candle windows for a batch in one round trip (the reader DSN's pool: read-only role)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def fetch(self, wanted: Mapping[tuple[str, str], tuple[float, int]]) -> dict[tuple[str, str], Window]:
        """`{(instrument, timeframe): (latest event time, candles)}` -> windows of that many candles as
        of that time (the caller adds the batch's events to the bars its scripts read)."""
        if not wanted:
            return {}
        keys = list(wanted)
        args = [[k[0] for k in keys], [k[1] for k in keys],
                [datetime.fromtimestamp(wanted[k][0], tz=UTC) for k in keys],
                [wanted[k][1] for k in keys]]
        with self.pool.connection() as conn:
            rows = conn.cursor(binary=True).execute(_WINDOWS_SQL, args).fetchall()
        out: dict[tuple[str, str], Window] = {}
        for inst, tf, n, count, blob in rows:
            values = array("d")
            values.frombytes(bytes(blob or b""))
            if sys.byteorder == "little":
                values.byteswap()  # float8send is big-endian; the child maps native float64
            width = len(CANDLE_COLUMNS)
            if len(values) != width * count:
                continue  # never expected (NOT NULL columns); then the gateway answers
            columns = array("d")
            for c in range(width):  # row-major -> column-major
                columns.extend(values[c::width])
            out[(inst, tf)] = Window(inst, tf, wanted[(inst, tf)][0], count, count < n, columns.tobytes())
        return out


def jsonb_normal(value: Any, depth: int = 0) -> Any:
    """`value` as json.loads(jsonb output) returns it: object keys ordered by (byte length, bytes).
    Raises ValueError for what a jsonb round trip changes in other ways (floats printed with a
    positive exponent come back as integers, -0.0 as 0.0, NaN is refused)."""
    if depth > 64:
        raise ValueError("nested too deeply")
    if isinstance(value, dict):
        items = sorted(((str(k), v) for k, v in value.items()), key=lambda kv: (len(kv[0].encode()),
                                                                                kv[0].encode()))
        return {k: jsonb_normal(v, depth + 1) for k, v in items}
    if isinstance(value, list):
        return [jsonb_normal(v, depth + 1) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value) or "e+" in repr(value) or (value == 0 and math.copysign(1, value) < 0):
            raise ValueError(f"float {value!r} changes in a jsonb round trip")
        return value
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("NUL in a string")
        return value
    raise ValueError(f"unexpected {type(value).__name__}")


def output_entry(row: OutputRow) -> dict[str, Any] | None:
    """A published row as the gateway's /latest answers it (value, timestamp, metadata), or None when
    the answer cannot be mirrored exactly (then the dependent reads through the gateway)."""
    if row.status != "ok" or isinstance(row.time, datetime):
        return None
    t = float(row.time)
    try:
        us = epoch_us(t)  # the timestamptz column keeps microseconds; the gateway reads it back as float8
        if isinstance(row.value, int | float) and not isinstance(row.value, bool):
            value: Any = float(row.value)  # the float8 column
            if not math.isfinite(value):
                return None
        elif row.value is None:
            return None  # stored as NULL in both columns: the gateway's answer is null; keep it simple
        else:
            value = jsonb_normal(row.value)
        metadata = jsonb_normal(row.metadata or {})
    except (ValueError, OverflowError, OSError):
        return None
    return {"script_id": row.script_id, "version": row.version, "instrument_key": row.instrument_key,
            "timeframe": row.timeframe, "params_hash": row.params_hash, "time": t,
            "value": value, "timestamp": us / 1_000_000, "metadata": metadata}


def encode(tenant: str, windows: Iterable[Window], outputs: Iterable[dict[str, Any]]) -> str:
    """The prefetch `data` string of one invocation: {"v", "tenant", "market": [window, ...], "outputs"},
    each window's JSON text made once per batch, not once per function it is sent to."""
    head = _WIRE_JSON.encode({"v": WIRE_VERSION, "tenant": tenant})
    return (f'{head[:-1]},"market":[{",".join(w.wire_json() for w in windows)}],'
            f'"outputs":{_WIRE_JSON.encode(list(outputs))}}}')
