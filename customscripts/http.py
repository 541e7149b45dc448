"""The python3-http handler contract, a small router on top of it, and servers and a client for it.

Platform functions are written as `handle(event, context)` exactly as OpenFaaS python3-http calls
them, and served one way, in images and locally alike: `HandlerServer` (templates/python3-http/index.py
through faas/runner.py, `LocalServer` in tests). It gives the upstream template's contract and
responses (status, JSON encoding, headers, error bodies; tests/python3_http_reference.py holds the
upstream Flask adapter they are checked against) without a framework: one thread per keep-alive
connection, no WSGI environ, no thread hand-off per request. Flask + waitress cost about 0.4 ms per
request on the 2-core dev machine, this about 0.05 ms; every execute crosses three function processes.

`KeepAlivePool` is the matching client: pooled `http.client` connections with TCP_NODELAY, about
0.05 ms per call against requests' 0.45 ms.

Why one module: (~900 lines) it is one wire format read and written in one place. Three parts, in
this order: the handler contract and router (`Event`, `Request`, `Router`, `parse_json`), the server
(`HandlerServer`, `call_handler`, `format_result`) and the client (`ClientConnection`, `KeepAlivePool`);
the server and the client share the wire layer (`Headers`, the header-line and header-count limits,
chunked bodies), so a split would put that layer in a fourth module imported by the other three
without making any of them smaller to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import http.client
import json
import math
import os
import queue
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from customscripts import logs
from customscripts.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    Malformed,
    MethodNotAllowed,
    NotFound,
    Throttled,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
)

MAX_BODY_BYTES = 1 << 20
# Arrays and objects nested deeper than this are refused at parse time (400 json_too_deep), so no
# recursive code downstream (pydantic, jsonschema, json.dumps for hashes and storage) ever sees more.
MAX_JSON_DEPTH = 64

log = logs.get("customscripts.http")


@dataclass
class Event:
    """What python3-http passes as `event` (body bytes, case-insensitive headers, query, path)."""

    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    method: str = "GET"
    query: Mapping[str, str] = field(default_factory=dict)
    path: str = "/"


@dataclass
class Context:
    hostname: str = "localhost"


@dataclass
class Request:
    """A routed request: the event plus path parameters and the call id."""

    event: Event
    params: dict[str, str]
    call_id: str

    @property
    def method(self) -> str:
        return self.event.method

    @property
    def query(self) -> Mapping[str, str]:
        return self.event.query

    def header(self, name: str) -> str | None:
        headers = self.event.headers
        value = headers.get(name)
        if value is None and isinstance(headers, dict):
            lowered = name.lower()
            for key, val in headers.items():
                if key.lower() == lowered:
                    return val
        return value

    def json(self) -> Any:
        body = self.event.body or b""
        if len(body) > MAX_BODY_BYTES:
            raise TooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        if not body.strip():
            raise Malformed("request body must be a JSON object", code="invalid_json")
        return parse_json(body)

    def json_object(self) -> dict[str, Any]:
        data = self.json()
        if not isinstance(data, dict):
            raise Malformed("request body must be a JSON object", code="invalid_json")
        return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_CONTAINERS = (dict, list, tuple)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply arrays and objects nest in `value` (a scalar is 0), counted level by level without
    recursion and given up as soon as it passes `limit` (then limit + 1)."""
    level = [value] if isinstance(value, _CONTAINERS) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return limit + 1
        below: list[Any] = []
        for item in level:
            below += [c for c in (item.values() if isinstance(item, dict) else item) if isinstance(c, _CONTAINERS)]
        level = below
    return depth


def parse_json(data: bytes | str, what: str = "request body", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON sent by an untrusted peer, the one parser for every HTTP body and JSON query parameter.

    400 `invalid_json` for anything but strict JSON (NaN, Infinity and numbers that overflow to
    infinity are not JSON values: every number with a fraction or an exponent is checked as it is
    read), 400 `json_too_deep` for arrays/objects nested more than `max_depth` levels, however deep:
    the decoder's own RecursionError is caught, and a shallower excess is found by a walk that runs
    only when the text holds more brackets than `max_depth` (never for ordinary small bodies).
    """
    raw = isinstance(data, bytes | bytearray)
    opens = data.count(b"[") + data.count(b"{") if raw else data.count("[") + data.count("{")
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep(what, max_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"{what} is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if opens > max_depth and json_depth(value, max_depth) > max_depth:
        raise _too_deep(what, max_depth)
    return value


def _too_deep(what: str, max_depth: int) -> Malformed:
    return Malformed(f"{what} nests arrays/objects more than {max_depth} levels deep", code="json_too_deep",
                     details={"max_depth": max_depth})


Response = dict[str, Any]
RouteHandler = Callable[[Request], Response]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return {"statusCode": status, "body": body, "headers": {"Content-Type": "application/json", **(headers or {})}}


# The one place a domain error becomes an HTTP status (customscripts/errors.py), most specific first.
HTTP_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (Malformed, 400), (Unauthenticated, 401), (Forbidden, 403), (NotFound, 404), (MethodNotAllowed, 405),
    (Conflict, 409), (TooLarge, 413), (Invalid, 422), (Throttled, 429), (UpstreamFailed, 502),
    (Unavailable, 503), (DomainError, 500),
)


BEARER_CHALLENGE = 'Bearer realm="customscripts"'  # RFC 6750: how a 401 says which credentials it wants


def http_status(exc: DomainError) -> int:
    return next(status for cls, status in HTTP_STATUS if isinstance(exc, cls))


def error_response(exc: DomainError) -> Response:
    headers = {} if exc.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = BEARER_CHALLENGE
    return json_response(exc.body(), http_status(exc), headers)


_PARAM = re.compile(r"\{(\w+)\}")
# Set by customscripts.metrics.register in a process that serves metrics: called with the route template a
# request matched ("unmatched" for none), its HTTP status and the seconds inside the handler.
request_observer: Callable[[str, int, float], None] | None = None


class Router:
    """Method + path-template routing; every error becomes a JSON body with its status."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], RouteHandler]] = []
        self._templates: dict[re.Pattern[str], str] = {}

    def route(self, method: str, template: str) -> Callable[[RouteHandler], RouteHandler]:
        pattern = re.compile("^" + _PARAM.sub(r"(?P<\1>[^/]+)", template) + "$")

        def register(func: RouteHandler) -> RouteHandler:
            self._routes.append((method.upper(), pattern, func))
            self._templates[pattern] = template
            return func

        return register

    def dispatch(self, event: Event) -> Response:
        call_id = _header(event.headers, "X-Call-Id") or uuid.uuid4().hex
        token = logs.call_id_var.set(call_id)
        started = time.perf_counter()
        try:
            response, template = self._dispatch(event, call_id)
        finally:
            logs.call_id_var.reset(token)
        if request_observer is not None:
            request_observer(template, int(response.get("statusCode", 200)), time.perf_counter() - started)
        response.setdefault("headers", {})["X-Call-Id"] = call_id
        return response

    def _dispatch(self, event: Event, call_id: str) -> tuple[Response, str]:
        """The response and the route template it came from (a bounded metric label; "unmatched": none)."""
        path = event.path or "/"
        allowed: list[str] = []
        template = "unmatched"
        for method, pattern, func in self._routes:
            match = pattern.match(path)
            if not match:
                continue
            allowed.append(method)
            template = self._templates[pattern]
            if method != event.method.upper():
                continue
            try:
                return func(Request(event, match.groupdict(), call_id)), template
            except DomainError as exc:
                return error_response(exc), template
            except RecursionError:
                # Input nested past what some recursive code can take: the caller's to fix, not a 500.
                log.warning("recursion limit hit on %s %s", event.method, path)
                return error_response(Malformed("request is nested too deeply to process", code="json_too_deep",
                                                details={"max_depth": MAX_JSON_DEPTH})), template
            except Exception:
                log.exception("unhandled error on %s %s", event.method, path)
                return error_response(DomainError("internal error")), template
        if allowed:
            reply = error_response(MethodNotAllowed(f"{event.method} not allowed on {path}"))
            reply["headers"]["Allow"] = ", ".join(sorted(set(allowed)))
            return reply, template
        return error_response(NotFound(f"no route for {path}", code="no_route")), template


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        for key, val in headers.items():
            if key.lower() == name.lower():
                return val
    return value


# --------------------------------------------------------------------------- lean server

# What the upstream python3-http adapter answers for methods outside its routes, and its body limit.
HANDLER_METHODS = frozenset({"GET", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "HEAD"})
MAX_REQUEST_BYTES = 8 * MAX_BODY_BYTES
_MAX_HEADER_LINE = 65536
_MAX_HEADERS = 100
_REASONS = http.client.responses


class Headers(Mapping[str, str]):
    """Request headers with case-insensitive lookup, as werkzeug's EnvironHeaders offers handlers."""

    __slots__ = ("_items", "_lower")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._lower: dict[str, str] = {}
        for key, value in items:
            low = key.lower()
            # repeated headers are joined as a WSGI server does (cookies aside, none matter here)
            self._lower[low] = f"{self._lower[low]},{value}" if low in self._lower else value

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self._lower.get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return self._lower[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._lower

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.title() for k, _ in self._items))

    def __len__(self) -> int:
        return len(self._lower)

    def items(self):  # type: ignore[override]
        return [(k.title(), self._lower[k]) for k in self._lower]


def _json_default(value: Any) -> Any:
    """Flask's DefaultJSONProvider default: the same output for dates, decimals, uuids, dataclasses."""
    if isinstance(value, datetime.date):
        from werkzeug.http import http_date

        return http_date(value)
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "__html__"):
        return str(value.__html__())
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def flask_json(body: Any) -> bytes:
    """Exactly what Flask's jsonify sends (sorted keys, compact, ASCII, trailing newline)."""
    return (json.dumps(body, default=_json_default, ensure_ascii=True, sort_keys=True,
                       separators=(",", ":")) + "\n").encode()


RawResponse = tuple[int, list[tuple[str, str]], bytes]


def _error_json(status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> RawResponse:
    """The platform's JSON error body for requests refused before the handler (as the upstream adapter's)."""
    body = flask_json({"error": {"code": code, "message": message}})
    return status, [("Content-Type", "application/json"), *(headers or [])], body


def call_handler(handle: Callable[[Event, Context], Any], context: Context, method: str, target: str,
                 headers: list[tuple[str, str]], body: bytes) -> RawResponse:
    """One python3-http call, answered as the upstream Flask adapter answers it: same statuses, bodies and
    content types."""
    if method not in HANDLER_METHODS:
        allow = ", ".join(sorted(HANDLER_METHODS))
        return _error_json(405, "method_not_allowed", "Method Not Allowed", [("Allow", allow)])
    if len(body) > MAX_REQUEST_BYTES:
        return _error_json(413, "payload_too_large", "Request Entity Too Large")
    raw_path, _, raw_query = target.partition("?")
    path = unquote(raw_path, errors="replace")
    if not path.startswith("/") or "\n" in path or "\r" in path:
        # werkzeug's path converter matches no line breaks: Flask answers 404 before the handler
        return _error_json(404, "no_route", "Not Found")
    query: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True, errors="replace"):
        query.setdefault(key, value)  # MultiDict.get: the first value
    event = Event(body=body, headers=Headers(headers), method=method, query=query, path=path)
    return format_result(handle(event, context))


def python3_http_result(response: Response) -> Any:
    """A route's response as a python3-http handler returns it. A bytes body cannot go in the dict
    (index.py sends it through str()), so it becomes the (body, status, headers) tuple that index.py
    hands to Flask unchanged (docs/openfaas.md §1.2) and `format_result` answers the same way."""
    body = response.get("body")
    if isinstance(body, bytes | bytearray):
        return bytes(body), int(response.get("statusCode", 200)), dict(response.get("headers") or {})
    return response


def format_result(result: Any) -> RawResponse:
    """python3-http's format_response: dict bodies as JSON, anything else as text; a (body, status,
    headers) tuple as Flask answers it."""
    if result is None:
        return 200, [("Content-Type", "text/html; charset=utf-8")], b""
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], bytes | str):
        raw, status, extra = result
        data = raw.encode() if isinstance(raw, str) else raw
        items = list(extra.items()) if isinstance(extra, Mapping) else list(extra)
        headers = [(str(k), str(v)) for k, v in items]
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.insert(0, ("Content-Type", "text/html; charset=utf-8"))
        return int(status), headers, data
    if not isinstance(result, dict):
        if isinstance(result, bytes | str):
            data = result.encode() if isinstance(result, str) else result
            return 200, [("Content-Type", "text/html; charset=utf-8")], data
        raise TypeError(f"handler returned {type(result).__name__}, not a response dict")
    status = int(result.get("statusCode", 200))
    body = result.get("body", "")
    extra = [(str(k), str(v)) for k, v in (result.get("headers") or {}).items()]
    if isinstance(body, dict | list):
        headers = [("Content-Type", "application/json")]
        data = flask_json(body)
    else:
        headers = [("Content-Type", "text/html; charset=utf-8")]
        data = str(body).encode()
    overridden = {k.lower() for k, _ in extra}
    headers = [h for h in headers if h[0].lower() not in overridden] + extra
    return status, headers, data


class _BadRequest(Exception):
    """A request that cannot be parsed; the connection is answered 400 and closed."""


def _read_request(rfile: Any) -> tuple[str, str, str, list[tuple[str, str]]] | None:
    """Request line and headers; None at a clean end of the connection."""
    line = rfile.readline(_MAX_HEADER_LINE + 1)
    while line in (b"\r\n", b"\n"):  # RFC 9112: ignore empty lines before a request
        line = rfile.readline(_MAX_HEADER_LINE + 1)
    if not line:
        return None
    if len(line) > _MAX_HEADER_LINE:
        raise _BadRequest("request line too long")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest("malformed request line")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(_MAX_HEADER_LINE + 1)
        if line in (b"\r\n", b"\n"):
            break
        if not line or len(line) > _MAX_HEADER_LINE or len(headers) >= _MAX_HEADERS:
            raise _BadRequest("malformed or oversized headers")
        key, sep, value = line.decode("latin-1").partition(":")
        if not sep or not key or key != key.strip():
            raise _BadRequest("malformed header line")
        headers.append((key, value.strip()))
    return method, target, version, headers


def _read_body(rfile: Any, headers: Headers, max_body: int) -> bytes:
    """Content-Length or chunked; over `max_body` raises TooLarge (answered 413)."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        chunks, total = [], 0
        while True:
            size_line = rfile.readline(_MAX_HEADER_LINE + 1)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _BadRequest("malformed chunk size") from None
            if size == 0:
                while rfile.readline(_MAX_HEADER_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > max_body:
                raise TooLarge("request body too large")
            chunks.append(rfile.read(size))
            rfile.readline(3)
    raw = headers.get("Content-Length")
    if raw is None:
        return b""
    try:
        length = int(raw)
    except ValueError:
        raise _BadRequest("malformed Content-Length") from None
    if length < 0:
        raise _BadRequest("malformed Content-Length")
    if length > max_body:
        raise TooLarge("request body too large")
    data = rfile.read(length) if length else b""
    if len(data) != length:
        raise _BadRequest("request body shorter than Content-Length")
    return data


def _response_bytes(status: int, headers: list[tuple[str, str]], body: bytes, *, head: bool,
                    close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"]
    for key, value in headers:
        if key.lower() not in ("content-length", "connection", "transfer-encoding"):
            lines.append(f"{key}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    head_bytes = "".join(lines).encode("latin-1", errors="replace")
    return head_bytes if head or status in (204, 304) else head_bytes + body


# (method, target, headers, body) -> response; with `with_peer`, the client's address comes fifth.
RawHandler = Callable[..., RawResponse]


def listen_socket(address: str, backlog: int = 1024) -> socket.socket:
    """A listening socket for `host:port` or `unix:/path` (a stale socket file at the path is replaced)."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(backlog)
        return sock
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be host:port or unix:/path, not {address!r}")
    return socket.create_server((host.strip("[]") or "0.0.0.0", int(port)), backlog=backlog)


class HandlerServer:
    """A threaded HTTP/1.1 server for one handler: a thread per keep-alive connection, at most
    `threads` requests inside the handler at once (waitress's `threads`), TCP_NODELAY both ways.

    `raw` takes (method, target, headers, body[, peer address]) and answers (status, headers, body);
    `for_handler` wraps a python3-http `handle(event, context)`.
    """

    def __init__(self, raw: RawHandler, host: str = "127.0.0.1", port: int = 0, *, threads: int = 8,
                 idle_timeout: float = 120.0, backlog: int = 1024, max_body: int = MAX_REQUEST_BYTES,
                 name: str = "http", with_peer: bool = False, listen: str | None = None) -> None:
        self.raw = raw
        self.max_body = max_body
        self.with_peer = with_peer
        self.listener = listen_socket(listen, backlog) if listen else socket.create_server((host, port),
                                                                                              backlog=backlog)
        self.unix = self.listener.family == socket.AF_UNIX
        self.port: int = 0 if self.unix else self.listener.getsockname()[1]
        self.host = self.listener.getsockname() if self.unix else self.listener.getsockname()[0]
        self.idle_timeout = idle_timeout
        self.name = name
        self._slots = threading.BoundedSemaphore(max(1, threads))
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @classmethod
    def for_handler(cls, handle: Callable[[Event, Context], Any], host: str = "127.0.0.1", port: int = 0,
                    **kwargs: Any) -> HandlerServer:
        context = Context(hostname=socket.gethostname())

        def raw(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> RawResponse:
            return call_handler(handle, context, method, target, headers, body)

        return cls(raw, host, port, **kwargs)

    def serve_forever(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self.listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            peer = "unix" if self.unix else str(addr[0])
            threading.Thread(target=self._serve_conn, args=(conn, peer), name=f"{self.name}-conn",
                             daemon=True).start()

    def drop_connections(self) -> None:
        """Close every open connection (a crash, as far as clients can tell)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting and drop open connections; requests inside the handler finish unanswered."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()
        self.drop_connections()

    def _serve_conn(self, conn: socket.socket, peer: str) -> None:
        try:
            if not self.unix:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.idle_timeout)
            rfile = conn.makefile("rb", buffering=65536)
            while not self._closed.is_set():
                if not self._one(conn, rfile, peer):
                    return
        except (OSError, ValueError):  # peer went away, idle timeout, or closed by close()
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _one(self, conn: socket.socket, rfile: Any, peer: str) -> bool:
        """Serve one request; False when the connection is to be closed."""
        try:
            request = _read_request(rfile)
            if request is None:
                return False
            method, target, version, header_list = request
            headers = Headers(header_list)
            if (headers.get("Expect") or "").lower() == "100-continue" and version == "HTTP/1.1":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _read_body(rfile, headers, self.max_body)
        except _BadRequest as exc:
            status, hdrs, data = _error_json(400, "bad_request", f"Bad Request: {exc}")
            conn.sendall(_response_bytes(status, hdrs, data, head=False, close=True))
            return False
        except TooLarge:
            status, hdrs, data = _error_json(413, "payload_too_large", "Request Entity Too Large")
            conn.sendall(_response_bytes(status, hdrs, data, head=False, close=True))
            return False
        token = (headers.get("Connection") or "").lower()
        close = "close" in token if version == "HTTP/1.1" else "keep-alive" not in token
        with self._slots:
            try:
                if self.with_peer:
                    status, hdrs, data = self.raw(method, target, header_list, body, peer)
                else:
                    status, hdrs, data = self.raw(method, target, header_list, body)
            except Exception:
                log.exception("unhandled error serving %s %s", method, target[:200])
                status, hdrs, data = _error_json(500, "internal_error", "Internal Server Error")
        conn.sendall(_response_bytes(status, hdrs, data, head=method == "HEAD", close=close))
        return not close


class LocalServer:
    """A handler served on 127.0.0.1 in background threads (tests, benches), as function processes are."""

    def __init__(self, handle: Callable[[Event, Context], Any], port: int = 0, threads: int = 8) -> None:
        self.server = HandlerServer.for_handler(handle, "127.0.0.1", port, threads=threads, name="local")
        self.port: int = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-http", daemon=True)

    def start(self) -> LocalServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.close()
        if self._thread.is_alive():
            self._thread.join(5)


# --------------------------------------------------------------------------- keep-alive client


@dataclass
class RawReply:
    """A response read whole: status, headers (case-insensitive), body."""

    status: int
    headers: Headers
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_NO_BODY_STATUS = frozenset({204, 304})


class ClientConnection:
    """One keep-alive HTTP/1.1 client connection with TCP_NODELAY.

    Leaner than `http.client` on the hot path (the request goes out in one write; the response
    headers are split by hand, not through the email package). Reads Content-Length, chunked and
    read-until-close bodies. Errors are OSError / http.client exceptions, as http.client raises:
    a connection closed before a status line is `http.client.RemoteDisconnected`.
    """

    def __init__(self, host: str, port: int, connect_timeout: float, timeout: float,
                 unix_path: str | None = None) -> None:
        if unix_path:  # a function in a container without a network reaches its peers by socket files
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(connect_timeout)
            try:
                self.sock.connect(unix_path)
            except OSError:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.rfile = self.sock.makefile("rb", buffering=65536)
        self.host_header = host if port == 80 else f"{host}:{port}"

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def idle_readable(self) -> bool:
        """True if the peer closed it (or sent something unasked) while it sat idle: not reusable."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def request(self, method: str, target: str, headers: list[tuple[str, str]] | Mapping[str, str],
                body: bytes | None, *, host: bool = True) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        """Send one request and read the whole response: (status, headers, body, will_close)."""
        items = headers.items() if isinstance(headers, Mapping) else headers
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        if host:
            lines.append(f"Host: {self.host_header}\r\n")
        for key, value in items:
            lines.append(f"{key}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}\r\n")
        lines.append("\r\n")
        self.sock.sendall("".join(lines).encode("latin-1") + (body or b""))
        return self._response(method)

    def _response(self, method: str) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        rfile = self.rfile
        while True:
            line = rfile.readline(_MAX_HEADER_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("Remote end closed connection without response")
            parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise http.client.BadStatusLine(line[:200].decode("latin-1"))
            try:
                status = int(parts[1])
            except ValueError:
                raise http.client.BadStatusLine(line[:200].decode("latin-1")) from None
            headers: list[tuple[str, str]] = []
            while True:
                hline = rfile.readline(_MAX_HEADER_LINE + 1)
                if hline in (b"\r\n", b"\n"):
                    break
                if not hline:
                    raise http.client.IncompleteRead(b"")
                if len(headers) >= _MAX_HEADERS:
                    raise http.client.LineTooLong("too many headers")
                key, _, value = hline.decode("latin-1").partition(":")
                headers.append((key.strip(), value.strip()))
            if 100 <= status < 200:
                continue  # 100 Continue and other interim answers precede the real one
            break
        keep_alive = parts[0] == "HTTP/1.1"
        length: int | None = None
        chunked = False
        for key, value in headers:
            low = key.lower()
            if low == "content-length":
                length = int(value)
            elif low == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif low == "connection":
                token = value.lower()
                keep_alive = "close" not in token if keep_alive else "keep-alive" in token
        if method == "HEAD" or status in _NO_BODY_STATUS:
            data = b""
        elif chunked:
            data = self._chunked()
        elif length is not None:
            data = rfile.read(length)
            if len(data) != length:
                raise http.client.IncompleteRead(data, length - len(data))
        else:
            data = rfile.read()
            keep_alive = False
        return status, headers, data, not keep_alive

    def _chunked(self) -> bytes:
        chunks = []
        while True:
            size_line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise http.client.IncompleteRead(b"".join(chunks)) from None
            if size == 0:
                while self.rfile.readline(_MAX_HEADER_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                raise http.client.IncompleteRead(chunk, size - len(chunk))
            chunks.append(chunk)
            self.rfile.readline(3)


class KeepAlivePool:
    """Pooled keep-alive connections (`ClientConnection`) to one host, shareable by every thread.

    Nothing per caller lives in the pool (headers are per call), so one pool serves requests made
    with different credentials. A connection that the server has closed while idle is noticed before
    use (readable socket) and replaced; a failure on a reused connection is retried once on a fresh
    one for idempotent methods, never for POST (it may have run).
    """

    def __init__(self, host: str, port: int, *, maxsize: int = 32, unix_path: str | None = None) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self._idle: queue.LifoQueue[ClientConnection] = queue.LifoQueue(maxsize)

    @classmethod
    def for_url(cls, base_url: str, **kwargs: Any) -> tuple[KeepAlivePool, str]:
        """(pool, path prefix) for an `http://host[:port][/prefix]` URL, or `http+unix://<socket path,
        percent-encoded>[/prefix]` (requests-unixsocket's form) for a server on a socket file."""
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        if parts.scheme == "http+unix" and parts.netloc:
            return cls("localhost", 80, unix_path=unquote(parts.netloc), **kwargs), parts.path.rstrip("/")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"KeepAlivePool speaks plain http only, not {base_url!r}")
        return cls(parts.hostname, parts.port or 80, **kwargs), parts.path.rstrip("/")

    def checkout(self, connect_timeout: float, timeout: float) -> tuple[ClientConnection, bool]:
        """An idle live connection (reused=True) or a new one."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if conn.idle_readable():
                conn.close()
                continue
            conn.settimeout(timeout)
            return conn, True
        return ClientConnection(self.host, self.port, connect_timeout, timeout, self.unix_path), False

    def release(self, conn: ClientConnection) -> None:
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None,
                timeout: float | tuple[float, float] = 30.0) -> RawReply:
        """Send one request and read the whole response; raises OSError/HTTPException on failure.

        `timeout` is seconds, or (connect, read) as requests takes it.
        """
        connect_timeout, read_timeout = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        for attempt in (1, 2):
            conn, reused = self.checkout(connect_timeout, read_timeout)
            try:
                status, rheaders, data, will_close = conn.request(method, path, headers or {}, body)
            except (OSError, http.client.HTTPException):
                conn.close()
                if attempt == 1 and reused and method in _IDEMPOTENT:
                    continue
                raise
            if will_close:
                conn.close()
            else:
                self.release(conn)
            return RawReply(status, Headers(rheaders), data)
        raise AssertionError("unreachable")

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
