"""Answering a child's read calls (market data, metrics, other scripts' outputs) for the supervisor.

Each call is parsed once (`parse_read`): strings bounded, numbers finite, limits capped, `end`
clamped to the item's as-of, since a script may never read past the event it runs for. The parsed
call is the cache key for the request and what the prefetch and the data source both answer, so the
two can never disagree about what was asked. A reply is the encoded frame for the child: market and
metric columns go as raw float64 (protocol.binary_frame), everything else as strict JSON.

Failures of the data source are remembered per item (`failures`): the supervisor, not the child,
decides what explains a failed item (`apply_data_failure`).
"""

from __future__ import annotations

import functools
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from customscripts import logs

from . import protocol
from .datasource import (
    ColumnFrames,
    DataAccessError,
    DataDenied,
    DataSource,
    DataSourceUnavailable,
    DeadlineExceeded,
    DependencyNotPublished,
    DependencyUnavailable,
    read_deadline,
)
from .prefetch import Handover, Prefetched, params_hash
from .results import ExecutionResult
from .windows import DEFAULT_LIMIT, read_limit, read_text, read_time

log = logs.get("customscripts.sandbox")

BINARY_FNS = frozenset({"market", "metric"})  # replies the child turns into numpy columns (Bars)
READ_FNS = ("market", "metric", "script_output")


@dataclass
class ExecutionRequest:
    """One item to execute, and where its reads are answered from."""

    instrument_key: str
    timeframe: str
    params: dict
    timestamp: float
    data: DataSource | None = None
    prefetch: Prefetched | None = None  # reads the scheduler sent along; answered here when covered

    def wire(self) -> dict:
        return {"instrument_key": self.instrument_key, "timeframe": self.timeframe,
                "params": self.params or {}, "timestamp": float(self.timestamp)}


@dataclass(frozen=True, slots=True)
class ReadCall:
    """A validated read call. `subject` is the timeframe (market, script_output) or the metric's name;
    `end` is already clamped to `as_of` (`as_of` itself for script outputs). Hashable: the request's
    reply cache is keyed by it."""

    fn: str
    instrument_key: str
    subject: str
    as_of: float
    end: float
    limit: int = DEFAULT_LIMIT
    start: float | None = None
    script_id: str = ""
    history: int | None = None
    params_key: Any = None
    params: dict | None = field(default=None, compare=False, hash=False)


def parse_read(fn: Any, args: dict, as_of: float) -> ReadCall:
    """The call, validated; ValueError (or OverflowError) says what is wrong with it."""
    if fn in ("market", "metric"):
        key = read_text(args.get("instrument_key"), 64)
        subject = read_text(args.get("timeframe"), 16) if fn == "market" else read_text(args.get("name"), 64)
        start, end = read_time(args.get("start")), read_time(args.get("end"))
        end = as_of if end is None else min(end, as_of)  # as-of: never later
        return ReadCall(fn, key, subject, as_of, end, limit=read_limit(args.get("limit")), start=start)
    if fn == "script_output":
        sid, key, tf = read_text(args.get("script_id"), 128), read_text(args.get("instrument_key"), 64), \
            read_text(args.get("timeframe"), 16)
        params = args.get("params")
        if params is not None and not isinstance(params, dict):
            raise ValueError("params must be an object")
        history = args.get("history")
        try:
            frozen = None if params is None else _freeze(params)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        return ReadCall(fn, key, tf, as_of, as_of, script_id=sid,
                        history=None if history is None else read_limit(history),
                        params_key=frozen, params=params)
    raise ValueError(f"unknown read call {str(fn)[:40]!r}")


def answer_frame(msg: dict, req: ExecutionRequest, source: DataSource | None, failures: list[BaseException],
                 cache: dict[tuple, bytes], deadline: float) -> bytes:
    """The encoded reply to one read call; successful replies are cached for the request (key: data
    source and the parsed call). `deadline` (perf_counter) is the item's wall-time end: the data source
    gets what is left of it (TimeoutError once it is spent)."""
    args = msg.get("args")
    if source is None and req.prefetch is None:
        return _error("data_error", "no data source configured")
    if not isinstance(args, dict):
        return _error("data_error", "no data source configured" if source is None else "invalid arguments")
    try:
        call = parse_read(msg.get("fn"), args, float(req.timestamp))
    except (ValueError, OverflowError) as exc:
        return _error("data_error", "no data source configured" if source is None else f"invalid read call: {exc}")
    key = (id(source), call)
    cached = cache.get(key)
    if cached is not None:
        return cached
    data = None if req.prefetch is None else prefetched_reply(call, req, req.prefetch)
    if data is None:
        if source is None:
            return _error("data_error", "no data source configured")
        token = read_deadline.set(time.monotonic() + (deadline - time.perf_counter()))
        try:
            reply = source_reply(call, source, failures)
        finally:
            read_deadline.reset(token)
        if isinstance(reply, bytes):  # a columns frame from the source, ready for the child
            data = reply
        elif "ok" not in reply:
            return protocol.frame(reply, allow_nan=True)
        else:
            data = ((_binary_reply(reply["ok"]) if call.fn in BINARY_FNS else None)
                    or protocol.frame(reply, allow_nan=True))
    cache[key] = data
    return data


def prefetched_reply(call: ReadCall, req: ExecutionRequest, pre: Prefetched) -> bytes | None:
    """The reply from the request's prefetch when it certainly equals the data source's answer; None
    sends the read to the data source."""
    try:
        if call.fn == "market":
            if (call.instrument_key, call.subject) != (req.instrument_key, req.timeframe):
                return None  # only the item's own series: what its evaluation was scheduled for
            return pre.market_frame(call.instrument_key, call.subject, limit=call.limit, start=call.start,
                                    end=call.end, as_of=call.as_of)
        if call.fn == "script_output" and call.history is None:
            hit = pre.script_output(call.script_id, call.instrument_key, call.subject, params_hash(call.params),
                                    call.as_of)
            return None if hit is None else protocol.frame({"ok": hit}, allow_nan=True)
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def event_runs(reqs: list[ExecutionRequest]) -> list[tuple[int, int]]:
    """The batch's events as (index of the first item, index after the last): runs of consecutive
    items with one timestamp and prefetch."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(reqs):
        pre, ts = reqs[i].prefetch, float(reqs[i].timestamp)
        j = i + 1
        while j < len(reqs) and reqs[j].prefetch is pre and float(reqs[j].timestamp) == ts:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def handover_events(runs: list[tuple[int, int]], reqs: list[ExecutionRequest]) -> dict[int, int]:
    """The events (`event_runs`) the child gets a handover for (prefetch.Prefetched.handover), as
    {index of the event's first item: index after its last}: every event with prefetched data. A
    handover costs what one read's reply costs (it holds only as many candles as the reads needed so
    far) and saves the child a round trip per read: a series' one-item bar ends included."""
    return {i: j for i, j in runs if (pre := reqs[i].prefetch) is not None and (pre.windows or pre.outputs)}


def handover(reqs: list[ExecutionRequest], first: int, stop: int) -> Handover:
    """The data the child gets for the event of reqs[first:stop]."""
    pre = reqs[first].prefetch
    assert pre is not None
    return pre.handover({(r.instrument_key, r.timeframe) for r in reqs[first:stop]}, float(reqs[first].timestamp))


def source_reply(call: ReadCall, source: DataSource, failures: list[BaseException]) -> dict | bytes:
    """The data source's reply: {"ok": ...} or {"err": ...}, or a complete binary frame when the source
    answers market and metric reads as columns (`ColumnFrames`, e.g. GatewayClient)."""
    try:
        if call.fn == "market":
            if _frames(type(source)):
                return _columns_frame(source.market_columns(call.instrument_key, call.subject, limit=call.limit,
                                                            start=call.start, end=call.end))
            return {"ok": source.get_market_data(call.instrument_key, call.subject, limit=call.limit,
                                                 start=call.start, end=call.end)}
        if call.fn == "metric":
            if _frames(type(source)):
                return _columns_frame(source.metric_columns(call.instrument_key, call.subject, limit=call.limit,
                                                            start=call.start, end=call.end))
            return {"ok": source.get_metric(call.instrument_key, call.subject, limit=call.limit,
                                            start=call.start, end=call.end)}
        return {"ok": source.get_script_output(call.script_id, call.instrument_key, call.subject,
                                               params=call.params, history=call.history)}
    except DeadlineExceeded:
        raise TimeoutError from None  # the read would outlast the execution's wall timeout
    except (ValueError, OverflowError) as exc:
        return {"err": {"kind": "data_error", "message": f"invalid read call: {exc}"}}
    except DependencyUnavailable as exc:
        failures.append(exc)
        return {"err": {"kind": "dependency_unavailable", "message": str(exc)}}
    except DataDenied as exc:
        failures.append(exc)
        return {"err": {"kind": "denied", "message": str(exc) or "read denied"}}
    except DataAccessError as exc:
        failures.append(exc)
        return {"err": {"kind": "data_error", "message": str(exc)}}
    except Exception as exc:
        logs.event(log, "data source failed", error=repr(exc))
        failures.append(DataAccessError(f"data source failed: {type(exc).__name__}"))
        return {"err": {"kind": "data_error", "message": "data source failed"}}


def apply_data_failure(res: ExecutionResult, failures: list[BaseException]) -> None:
    """The supervisor, not the child, decides: the data failure it saw explains the error."""
    traceback = (res.error or {}).get("traceback", "")
    for exc in failures:
        if isinstance(exc, DataDenied):
            res.status = "denied"
            res.error = {"type": "DataDenied", "message": str(exc) or "read denied", "traceback": traceback}
            return
    missing = [exc for exc in failures if isinstance(exc, DependencyUnavailable)]
    if missing:
        first = missing[0]
        res.status = "dependency_failed"
        res.error = {"type": type(first).__name__, "message": str(first), "dependency": first.script_id,
                     "traceback": traceback}
        # only bars the gateway named as not (yet) published: the scheduler tries it again (by type)
        res.retryable = all(isinstance(e, DependencyNotPublished) for e in missing)
        if res.retryable:
            res.error["missing_bar_ends"] = sorted({t for e in missing if isinstance(e, DependencyNotPublished)
                                                    for t in e.bars})[:10]
        return
    exc = failures[-1]
    res.error = {"type": "DataAccessError", "message": str(exc), "traceback": traceback}
    res.retryable = isinstance(exc, DataSourceUnavailable)  # by type, from what this side saw


def _error(kind: str, message: str) -> bytes:
    return protocol.frame({"err": {"kind": kind, "message": message}}, allow_nan=True)


def _freeze(value: Any, depth: int = 0) -> Any:
    """A hashable form of JSON call arguments (TypeError if too deep)."""
    if depth > 8:
        raise TypeError("arguments nested too deeply")
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, list):
        return ("[", *(_freeze(v, depth + 1) for v in value))
    return (type(value).__name__, value)


def _binary_reply(payload: Any) -> bytes | None:
    """{"columns": {name: numbers}, ...} -> a binary frame the child maps with numpy.frombuffer; None
    when the payload is not purely numeric columns (then it goes as JSON)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("columns"), dict):
        return None
    head = {k: v for k, v in payload.items() if k != "columns"}
    body = protocol.columns_payload(head, payload["columns"])
    return None if body is None else _child_frame(body)


@functools.cache
def _frames(source_type: type) -> bool:
    """Whether a data source type answers with columns payloads (Protocol isinstance, once per type)."""
    return issubclass(source_type, ColumnFrames)


def _columns_frame(columns_body: bytes) -> bytes:
    frame = _child_frame(columns_body)
    if frame is None:
        raise DataAccessError("the data source sent a malformed columns reply")
    return frame


def _child_frame(columns_body: bytes | bytearray) -> bytes | None:
    """A columns payload (protocol.columns_payload: the data source's head + "f64" spec + columns) as
    the child's reply frame {"ok": head, "f64": spec} + the same columns; None if it is malformed."""
    try:
        split = protocol.split_binary(bytearray(columns_body) if isinstance(columns_body, bytes) else columns_body)
    except (ValueError, struct.error):
        return None
    if split is None or not isinstance(split[0], dict):
        return None
    head, blob = split
    spec = head.pop("f64", None)
    try:
        if not isinstance(spec, list) or sum(int(n) for _, n in spec) * 8 != len(blob):
            return None
    except (TypeError, ValueError):
        return None
    return protocol.binary_frame({"ok": head, "f64": spec}, bytes(blob))
