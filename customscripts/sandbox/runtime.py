"""The child's side: the script API (ctx, read calls over the pipe) and the per-item run loop.

Why here: everything the user's code can touch lives in this module, inside the sandbox. Nothing in it
is trusted by the supervisor - results are re-validated there - so this code only aims at good
error messages (trimmed tracebacks, clear types) and bounded logs. Stdlib + numpy only.
"""

from __future__ import annotations

import io
import json
import math
import socket
import sys
import time
import traceback
import types
from typing import Any

from . import protocol

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


class Bars:
    """Columnar market data: bars.close, bars["close"], len(bars); columns are numpy arrays."""

    def __init__(self, payload: dict) -> None:
        import numpy as np

        self.instrument_key = payload.get("instrument_key")
        self.timeframe = payload.get("timeframe")
        cols = payload.get("columns") or {}
        self.columns = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}

    def __getattr__(self, name: str) -> Any:
        cols = self.__dict__.get("columns", {})
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

    def __repr__(self) -> str:
        return f"Bars({self.instrument_key!r}, {self.timeframe!r}, n={len(self)})"


class _Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def call(self, fn: str, args: dict) -> Any:
        protocol.send_frame(self.sock, {"op": "call", "fn": fn, "args": args})
        reply = protocol.recv_frame(self.sock, MAX_REPLY_BYTES)
        if "err" in reply:
            err = reply["err"]
            raise _ERRORS.get(err.get("kind"), DataAccessError)(err.get("message", "data error"))
        return reply.get("ok")


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
        payload = self._channel.call("market", {
            "instrument_key": instrument_key or self.instrument_key, "timeframe": timeframe or self.timeframe,
            "limit": limit, "start": start, "end": end})
        return Bars(payload)

    def get_metric(self, name: str, instrument_key: str | None = None, limit: int = 200,
                   start: float | None = None, end: float | None = None) -> Bars:
        payload = self._channel.call("metric", {
            "instrument_key": instrument_key or self.instrument_key, "name": name, "limit": limit,
            "start": start, "end": end})
        return Bars(payload)

    def get_script_output(self, script_id: str, instrument_key: str | None = None,
                          timeframe: str | None = None, params: dict | None = None,
                          history: int | None = None) -> Any:
        return self._channel.call("script_output", {
            "script_id": script_id, "instrument_key": instrument_key or self.instrument_key,
            "timeframe": timeframe or self.timeframe, "params": params, "history": history})


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
    """Prepared once in the zygote; serve() runs in each forked child."""

    def __init__(self, *, code: types.CodeType | None, compile_error: dict | None, filename: str,
                 script_builtins: dict | None, max_log_bytes: int, max_output_bytes: int) -> None:
        self.code = code
        self.compile_error = compile_error
        self.filename = filename
        self.script_builtins = script_builtins
        self.max_log_bytes = max_log_bytes
        self.max_output_bytes = max_output_bytes

    def serve(self, sock: socket.socket) -> None:
        try:
            req = protocol.recv_frame(sock, MAX_REPLY_BYTES)
        except protocol.ProtocolError:
            return
        items = req.get("items") or []
        channel = _Channel(sock)
        out = BoundedWriter(self.max_log_bytes)
        err = BoundedWriter(self.max_log_bytes)
        sys.stdout, sys.stderr = out, err
        module_error: dict | None = self.compile_error
        run = None
        g: dict[str, Any] = {}
        if module_error is None:
            import builtins as _b

            g = {"__name__": "__script__", "__file__": self.filename,
                 "__builtins__": self.script_builtins if self.script_builtins is not None else _b}
            current: list[Context] = []

            def _ctx() -> Context:
                if not current:
                    raise RuntimeError("read APIs are only available while run(ctx) executes")
                return current[-1]

            g["get_market_data"] = lambda *a, **k: _ctx().get_market_data(*a, **k)
            g["get_metric"] = lambda *a, **k: _ctx().get_metric(*a, **k)
            g["get_script_output"] = lambda *a, **k: _ctx().get_script_output(*a, **k)
            g.update({"DependencyUnavailable": DependencyUnavailable, "DataDenied": DataDenied,
                      "DataAccessError": DataAccessError, "DataError": DataError})
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
            t_cpu = time.process_time()
            msg: dict[str, Any]
            if module_error is not None:
                msg = {"op": "item", "kind": "error", "error": module_error}
            else:
                ctx = Context(item, channel)
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
            msg["cpu_ms"] = round((time.process_time() - t_cpu) * 1000, 3)
            msg["stdout"] = out.getvalue()
            msg["stderr"] = err.getvalue()
            try:
                data = protocol.dumps(msg, allow_nan=True)
            except (TypeError, ValueError) as exc:
                data = protocol.dumps({"op": "item", "kind": "invalid_output", "error": {
                    "type": "InvalidOutput", "message": f"output not serialisable: {exc}", "traceback": ""}})
            if len(data) > self.max_output_bytes + 2 * self.max_log_bytes + 4096:
                data = protocol.dumps({"op": "item", "kind": "invalid_output", "error": {
                    "type": "InvalidOutput", "message": f"output exceeds {self.max_output_bytes} bytes",
                    "traceback": ""}, "stdout": "", "stderr": ""})
            protocol.send_raw_frame(sock, data)
        protocol.send_frame(sock, {"op": "done"})


def _unused() -> None:  # keep json/math imported for scripts' warm start
    json.dumps(math.pi)
