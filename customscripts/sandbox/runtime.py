"""The child's side: the script API (ctx, read calls over the pipe) and the per-item run loop.

Why here: everything the user's code can touch lives in this module, inside the sandbox. Nothing in it
is trusted by the supervisor - results are re-validated there - so this code only aims at good
error messages (trimmed tracebacks, clear types) and bounded logs. Stdlib + numpy (+ pandas, disarmed, for
`Bars.df`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import sys
import traceback
import types
from typing import Any

from . import protocol
from .handover import SegmentData
from .windows import CANDLE_COLUMNS

MAX_REPLY_BYTES = 64 * 1024 * 1024  # supervisor -> child data replies


class DataError(Exception):
    """Base of the read-API errors a script may catch."""


class DependencyUnavailable(DataError):
    """Another script's output this script depends on is not available."""


class DataDenied(DataError):
    """The data source refused this read (not entitled)."""


class DataAccessError(DataError):
    """The data source failed after retries."""


_ERRORS = {"dependency_unavailable": DependencyUnavailable, "denied": DataDenied, "data_error": DataAccessError}


class BoundedWriter(io.TextIOBase):
    """sys.stdout/sys.stderr replacement that keeps the first `limit` bytes and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError("write() argument must be str")
        n = len(s.encode("utf-8", "replace"))
        room = self.limit - self.size
        if room <= 0:
            self.dropped += n
        elif n <= room:
            self.parts.append(s)
            self.size += n
        else:
            cut = s.encode("utf-8", "replace")[:room].decode("utf-8", "ignore")
            self.parts.append(cut)
            self.size = self.limit
            self.dropped += n - room
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n...[truncated {self.dropped} bytes]"
        return text


def _f64_columns(spec: Any, blob: memoryview) -> dict:
    """numpy views over a binary reply's raw float64 columns (writable: the buffer is ours)."""
    import numpy as np

    cols = {}
    off = 0
    for name, n in spec:
        cols[name] = np.frombuffer(blob, dtype=np.float64, count=n, offset=off)
        off += 8 * n
    return cols


class Bars:
    """Columnar market data: bars.close, bars["close"], len(bars); columns are numpy arrays.
    `bars.time` (also `bars.start`) is each bar's start, `bars.end_time` (`bars.end`) its end: the
    moment its close became known, never after the execution's as-of time."""

    ALIASES = {"start": "time", "end": "end_time"}

    def __init__(self, payload: dict, columns: dict | None = None) -> None:
        self.instrument_key = payload.get("instrument_key")
        self.timeframe = payload.get("timeframe")
        if columns is None:
            import numpy as np

            cols = payload.get("columns") or {}
            columns = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
        self.columns = columns

    def __getattr__(self, name: str) -> Any:
        cols = self.__dict__.get("columns", {})
        name = name if name in cols else self.ALIASES.get(name, name)
        if name in cols:
            return cols[name]
        raise AttributeError(name)

    def __getitem__(self, key: str) -> Any:
        return self.columns[key]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __contains__(self, key: object) -> bool:
        return key in self.columns

    def keys(self) -> list[str]:
        return list(self.columns)

    @property
    def df(self) -> Any:
        """The columns as a pandas DataFrame indexed by each bar's time (a UTC DatetimeIndex named
        `time`); other time columns (`end_time`) become UTC datetimes too. pandas comes disarmed
        (sandbox/pandas_guard.py). Built on each access: keep it in a variable."""
        from .pandas_guard import load

        pd = load()
        cols = dict(self.columns)
        times = cols.pop("time", None)
        for name in [k for k in cols if k.endswith("_time")]:
            cols[name] = pd.to_datetime(cols[name], unit="s", utc=True)
        index = None if times is None else pd.DatetimeIndex(pd.to_datetime(times, unit="s", utc=True), name="time")
        return pd.DataFrame(cols, index=index)

    def __repr__(self) -> str:
        return f"Bars({self.instrument_key!r}, {self.timeframe!r}, n={len(self)})"


class _Channel:
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.local: SegmentData | None = None  # the current event's handover, if the supervisor sent one
        self.item: Context | None = None  # the item running now: only its reads are answered locally

    def receive_handover(self) -> None:
        assert self.sock is not None
        split = protocol.split_binary(protocol.recv_frame_bytes(self.sock, MAX_REPLY_BYTES))
        if split is None:
            raise protocol.ProtocolError("expected the event's data")
        self.local = SegmentData(split[0], split[1])

    def call(self, fn: str, args: dict) -> tuple[Any, dict | None]:
        """(payload, numpy columns of a binary reply or None)."""
        assert self.sock is not None
        protocol.send_frame(self.sock, {"op": "call", "fn": fn, "args": args})
        return self.decode(protocol.recv_frame_bytes(self.sock, MAX_REPLY_BYTES))

    @staticmethod
    def decode(data: bytearray) -> tuple[Any, dict | None]:
        split = protocol.split_binary(data)  # the supervisor is trusted: binary columns are fine here
        if split is None:
            reply, cols = json.loads(data), None
        else:
            reply, blob = split
            cols = _f64_columns(reply.get("f64") or (), blob)
        if "err" in reply:
            err = reply["err"]
            raise _ERRORS.get(err.get("kind"), DataAccessError)(err.get("message", "data error"))
        return reply.get("ok"), cols


class Context:
    """What run(ctx) receives."""

    def __init__(self, item: dict, channel: _Channel) -> None:
        self.instrument_key: str = item["instrument_key"]
        self.timeframe: str = item["timeframe"]
        self.params: dict = dict(item.get("params") or {})
        self.timestamp: float = float(item["timestamp"])
        self._channel = channel

    def get_market_data(self, instrument_key: str | None = None, timeframe: str | None = None,
                        limit: int = 200, start: float | None = None, end: float | None = None) -> Bars:
        local = self._channel.local
        if local is not None and self._channel.item is self:
            hit = local.market(self.instrument_key, self.timeframe, self.timestamp, instrument_key, timeframe,
                               limit, start, end)
            if hit is not None:
                return Bars(*hit)
        payload, cols = self._channel.call("market", {
            "instrument_key": instrument_key or self.instrument_key, "timeframe": timeframe or self.timeframe,
            "limit": limit, "start": start, "end": end})
        return Bars(payload, cols)

    def get_metric(self, name: str, instrument_key: str | None = None, limit: int = 200,
                   start: float | None = None, end: float | None = None) -> Bars:
        payload, cols = self._channel.call("metric", {
            "instrument_key": instrument_key or self.instrument_key, "name": name, "limit": limit,
            "start": start, "end": end})
        return Bars(payload, cols)

    def get_script_output(self, script_id: str, instrument_key: str | None = None,
                          timeframe: str | None = None, params: dict | None = None,
                          history: int | None = None) -> Any:
        local = self._channel.local
        if local is not None and self._channel.item is self:
            hit = local.script_output(self.instrument_key, self.timeframe, self.timestamp, script_id,
                                      instrument_key, timeframe, params, history)
            if hit is not None:
                return hit
        return self._channel.call("script_output", {
            "script_id": script_id, "instrument_key": instrument_key or self.instrument_key,
            "timeframe": timeframe or self.timeframe, "params": params, "history": history})[0]


def to_jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON data from numbers/dicts/lists and numpy scalars/arrays; TypeError on anything else."""
    if depth > 20:
        raise TypeError("output nested too deeply")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.generic):
            return to_jsonable(value.item(), depth + 1)
        if isinstance(value, np.ndarray):
            if value.size > 100_000:
                raise TypeError("numpy array output too large")
            return to_jsonable(value.tolist(), depth + 1)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, pd.Series):  # a column's values, like a numpy array
        return to_jsonable(value.to_numpy(), depth + 1)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"output dict keys must be strings, got {type(k).__name__}")
            out[k] = to_jsonable(v, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(v, depth + 1) for v in value]
    raise TypeError(f"output of type {type(value).__name__} is not JSON-serialisable")


def format_error(exc: BaseException, filename: str) -> dict:
    """Exception type, message and a traceback trimmed to the script's own frames."""
    lines = []
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    for fr in frames[-20:]:
        lines.append(f'  File "{fr.filename}", line {fr.lineno}, in {fr.name}')
        if fr.line:
            lines.append(f"    {fr.line.strip()}")
    lineno = getattr(exc, "lineno", None)
    if not frames and isinstance(lineno, int):
        lines.append(f'  File "{filename}", line {lineno}')
    msg = str(exc)
    if isinstance(exc, MemoryError) and not msg:
        msg = "memory limit exceeded"
    tb = ("Traceback (script frames only):\n" + "\n".join(lines) + "\n" if lines else "")
    tb += f"{type(exc).__name__}: {msg}"
    return {"type": type(exc).__name__, "message": msg[:2000], "traceback": tb[-8000:]}


class Runtime:
    """Prepared once in the zygote; serve() runs in each forked child.

    A pre-forked child is fully set up before its request arrives: rlimits and seccomp are in place,
    the script's module namespace is built and prime() has run the request path once with synthetic
    data, so that the copy-on-write page faults of the first touch happen while the child is idle.
    User code (the script's module body and run(ctx)) only ever runs after the request arrives.
    """

    def __init__(self, *, code: types.CodeType | None, compile_error: dict | None, filename: str,
                 script_builtins: dict | None, max_log_bytes: int, max_output_bytes: int,
                 prime_imports: tuple[str, ...] = ()) -> None:
        self.code = code
        self.compile_error = compile_error
        self.filename = filename
        self.script_builtins = script_builtins
        self.max_log_bytes = max_log_bytes
        self.max_output_bytes = max_output_bytes
        self.prime_imports = prime_imports  # preloaded modules the script imports

    # -- idle-time preparation (no user code) ------------------------------------------------------
    def prime(self) -> None:
        """Run the request path once with synthetic data: in the zygote this fills lazy caches (json
        scanners, numpy ufunc dispatch, the import guard), in each child it pre-faults the pages a
        request writes to. Never runs user code."""
        item = {"instrument_key": "X", "timeframe": "1d", "params": {"p": 1}, "timestamp": 0.0}
        raw = bytearray(protocol.dumps({"op": "run", "items": [item]}))
        json.loads(raw)
        out = BoundedWriter(64)
        print("prime", 1.5, file=out)
        out.getvalue()
        ctx = Context(item, _Channel(None))
        if self.script_builtins is not None:
            imp = self.script_builtins["__import__"]
            for name in self.prime_imports:
                with contextlib.suppress(Exception):
                    imp(name, None, None, (), 0)
            self.script_builtins["__cs_getattr__"](ctx, "params")
        value: Any = 1.5
        if "numpy" in sys.modules:
            import numpy as np

            n = 64
            blob = bytearray(protocol.binary_frame(
                {"ok": {"instrument_key": "X", "timeframe": "1d"}, "f64": [["time", n], ["close", n]]},
                np.arange(2 * n, dtype=np.float64).tobytes())[protocol.HEADER.size:])
            payload, cols = _Channel.decode(blob)
            bars = Bars(payload, cols)
            close = bars.close
            k = len(CANDLE_COLUMNS)
            head = {"op": "data", "as_of": 1000.0, "windows": [["X", "1d", n, False]],
                    "outputs": [["s", "X", "1d", "{}"]]}
            handed = protocol.split_binary(bytearray(protocol.binary_payload(head,
                np.repeat(np.arange(n, dtype=np.float64), k).reshape(n, k).T.tobytes())))
            assert handed is not None
            ctx.timestamp = 1000.0
            channel = ctx._channel
            channel.local, channel.item = SegmentData(*handed), ctx
            channel.local.market("X", "1d", 1000.0, None, None, 20, None, None)
            channel.local.script_output("X", "1d", 1000.0, "s", None, None, None, None)
            channel.local = channel.item = None
            value = {"mean": float(np.mean(close[-20:])), "np": np.float64(1.0), "arr": close[:2]}
            len(bars)
        msg = {"op": "item", "kind": "ok", "value": to_jsonable(value), "stdout": out.getvalue(), "stderr": ""}
        protocol.dumps(msg)

    def _namespace(self, current: list[Context]) -> dict[str, Any]:
        import builtins as _b

        g: dict[str, Any] = {"__name__": "__script__", "__file__": self.filename,
                             "__builtins__": self.script_builtins if self.script_builtins is not None else _b}

        def _ctx() -> Context:
            if not current:
                raise RuntimeError("read APIs are only available while run(ctx) executes")
            return current[-1]

        g["get_market_data"] = lambda *a, **k: _ctx().get_market_data(*a, **k)
        g["get_metric"] = lambda *a, **k: _ctx().get_metric(*a, **k)
        g["get_script_output"] = lambda *a, **k: _ctx().get_script_output(*a, **k)
        g.update({"DependencyUnavailable": DependencyUnavailable, "DataDenied": DataDenied,
                  "DataAccessError": DataAccessError, "DataError": DataError})
        return g

    # -- one request -------------------------------------------------------------------------------
    def serve(self, sock: socket.socket) -> None:
        """Child protocol: <- run{items}; per item: (-> call, <- reply)*, -> item{kind, value|error,
        stdout, stderr}. After the last item the child waits on its socket: the supervisor measures it
        from outside (CPU clock, peak RSS) while it is still alive, then kills it. Nothing the child
        says about its own usage or state is believed."""
        self.prime()
        current: list[Context] = []
        g = self._namespace(current) if self.compile_error is None else {}
        out = BoundedWriter(self.max_log_bytes)
        err = BoundedWriter(self.max_log_bytes)
        try:
            req = protocol.recv_frame(sock, MAX_REPLY_BYTES, trusted=True)
        except protocol.ProtocolError:
            return
        items = req.get("items") or []
        channel = _Channel(sock)
        sys.stdout, sys.stderr = out, err
        module_error: dict | None = self.compile_error
        run = None
        if module_error is None:
            try:
                exec(self.code, g)
                run = g.get("run")
                if not callable(run):
                    module_error = {"type": "ScriptError", "message": "script must define run(ctx)",
                                    "traceback": ""}
            except BaseException as exc:
                module_error = format_error(exc, self.filename)
        for item in items:
            out.parts.clear(); out.size = out.dropped = 0  # noqa: E702
            err.parts.clear(); err.size = err.dropped = 0  # noqa: E702
            if item.get("data"):  # the first item of an event the supervisor hands data over for
                channel.receive_handover()
            local = channel.local
            if local is not None:
                local.hits = local.bars = 0
            msg: dict[str, Any]
            if module_error is not None:
                msg = {"op": "item", "kind": "error", "error": module_error}
            else:
                ctx = channel.item = Context(item, channel)
                current.append(ctx)
                try:
                    raw = run(ctx)  # type: ignore[misc]
                    msg = {"op": "item", "kind": "ok", "value": to_jsonable(raw)}
                except TypeError as exc:
                    if "serialisable" in str(exc) or "output" in str(exc):
                        msg = {"op": "item", "kind": "invalid_output",
                               "error": {"type": "InvalidOutput", "message": str(exc), "traceback": ""}}
                    else:
                        msg = {"op": "item", "kind": "error", "error": format_error(exc, self.filename)}
                except BaseException as exc:
                    msg = {"op": "item", "kind": "error", "error": format_error(exc, self.filename)}
                finally:
                    current.clear()
                    channel.item = None
            msg["stdout"] = out.getvalue()
            msg["stderr"] = err.getvalue()
            if local is not None and local.hits:
                msg["local"] = [local.hits, local.bars]
            try:
                data = protocol.dumps(msg)  # the supervisor rejects NaN/Infinity frames outright
            except (TypeError, ValueError) as exc:
                text = ("NaN and Infinity are not allowed in an output" if isinstance(exc, ValueError)
                        else f"output not serialisable: {exc}")
                data = protocol.dumps({"op": "item", "kind": "invalid_output", "error": {
                    "type": "InvalidOutput", "message": text, "traceback": ""},
                    "stdout": msg["stdout"], "stderr": msg["stderr"]})
            if len(data) > self.max_output_bytes + 2 * self.max_log_bytes + 4096:
                data = protocol.dumps({"op": "item", "kind": "invalid_output", "error": {
                    "type": "InvalidOutput", "message": f"output exceeds {self.max_output_bytes} bytes",
                    "traceback": ""}, "stdout": "", "stderr": ""})
            protocol.send_raw_frame(sock, data)
        with contextlib.suppress(OSError):  # done: wait to be measured and killed
            sock.recv(1)


def _unused() -> None:  # keep json/math imported for scripts' warm start
    json.dumps(math.pi)
