"""The python3-http handler contract, a small router on top of it, and a local server for it.

Platform functions are written as `handle(event, context)` exactly as OpenFaaS python3-http calls
them; `serve()` runs the same handler behind Flask + waitress as the template's index.py does, so
the local stack and OpenFaaS execute identical code.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from customscripts import logs
from customscripts.errors import ApiError, BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge

MAX_BODY_BYTES = 1 << 20

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
            raise PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        if not body.strip():
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None

    def json_object(self) -> dict[str, Any]:
        data = self.json()
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        return data


Response = dict[str, Any]
RouteHandler = Callable[[Request], Response]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return {"statusCode": status, "body": body, "headers": {"Content-Type": "application/json", **(headers or {})}}


def error_response(exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)


_PARAM = re.compile(r"\{(\w+)\}")


class Router:
    """Method + path-template routing; every error becomes a JSON body with its status."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], RouteHandler]] = []

    def route(self, method: str, template: str) -> Callable[[RouteHandler], RouteHandler]:
        pattern = re.compile("^" + _PARAM.sub(r"(?P<\1>[^/]+)", template) + "$")

        def register(func: RouteHandler) -> RouteHandler:
            self._routes.append((method.upper(), pattern, func))
            return func

        return register

    def dispatch(self, event: Event) -> Response:
        call_id = _header(event.headers, "X-Call-Id") or uuid.uuid4().hex
        token = logs.call_id_var.set(call_id)
        try:
            response = self._dispatch(event, call_id)
        finally:
            logs.call_id_var.reset(token)
        response.setdefault("headers", {})["X-Call-Id"] = call_id
        return response

    def _dispatch(self, event: Event, call_id: str) -> Response:
        path = event.path or "/"
        allowed: list[str] = []
        for method, pattern, func in self._routes:
            match = pattern.match(path)
            if not match:
                continue
            allowed.append(method)
            if method != event.method.upper():
                continue
            try:
                return func(Request(event, match.groupdict(), call_id))
            except ApiError as exc:
                return error_response(exc)
            except Exception:
                log.exception("unhandled error on %s %s", event.method, path)
                return error_response(ApiError("internal error"))
        if allowed:
            return error_response(MethodNotAllowed(f"{event.method} not allowed on {path}",
                                                   headers={"Allow": ", ".join(sorted(set(allowed)))}))
        return error_response(NotFound(f"no route for {path}", code="no_route"))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        for key, val in headers.items():
            if key.lower() == name.lower():
                return val
    return value


def flask_app(handle: Callable[[Event, Context], Any]):
    """The python3-http template's index.py, as a function: Flask app calling handle(event, context)."""
    from flask import Flask, jsonify, request

    app = Flask("customscripts-handler")
    app.config["MAX_CONTENT_LENGTH"] = 8 * MAX_BODY_BYTES
    context = Context(hostname=socket.gethostname())

    from werkzeug.exceptions import HTTPException

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # Requests Flask rejects before the handler (e.g. a path with a newline, an oversized body)
        # still answer with the platform's JSON error body, never Flask's HTML page.
        status = exc.code or 500
        code = {404: "no_route", 405: "method_not_allowed", 413: "payload_too_large"}.get(status, "bad_request")
        resp = jsonify({"error": {"code": code, "message": exc.name}})
        resp.status_code = status
        valid = getattr(exc, "valid_methods", None)
        if status == 405 and valid:
            resp.headers["Allow"] = ", ".join(valid)
        return resp

    def format_response(result: Any):
        if result is None:
            return ("", 200)
        if not isinstance(result, dict):
            return result
        status = result.get("statusCode", 200)
        body = result.get("body", "")
        headers = result.get("headers") or {}
        if isinstance(body, (dict, list)):
            resp = jsonify(body)
            resp.status_code = status
            for key, val in headers.items():
                resp.headers[key] = val
            return resp
        return (str(body), status, headers)

    # OPTIONS goes to the handler too, so its router answers with the Allow header of its own routes.
    methods = ["GET", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]

    @app.route("/", defaults={"path": ""}, methods=methods, provide_automatic_options=False)
    @app.route("/<path:path>", methods=methods, provide_automatic_options=False)
    def call_handler(path: str):
        event = Event(
            body=request.get_data(),
            headers=request.headers,
            method=request.method,
            query=request.args,
            path=request.path,
        )
        return format_response(handle(event, context))

    return app


class LocalServer:
    """A handler served on 127.0.0.1 by waitress in a background thread (tests, local stack)."""

    def __init__(self, handle: Callable[[Event, Context], Any], port: int = 0, threads: int = 8) -> None:
        from waitress.server import create_server

        self.server = create_server(flask_app(handle), host="127.0.0.1", port=port, threads=threads,
                                    clear_untrusted_proxy_headers=False)
        self.port: int = self.server.effective_port  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LocalServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        # Not server.close() from this thread: it closes waitress's trigger pipe while task threads
        # and open channels may still pull it, and that later os.write(b"x") lands on whatever reused
        # the fd number (seen as a stray "x" before another server's HTTP response). Stop the task
        # threads first, then close channels, listener and trigger inside the loop thread.
        server = self.server
        if server.trigger._closed:  # type: ignore[attr-defined]  # stopped already
            return
        closed = threading.Event()

        def close_all() -> None:
            for channel in list(server._map.values()):  # type: ignore[attr-defined]
                if channel is not server.trigger:  # type: ignore[attr-defined]
                    channel.close()
            server.trigger.close()  # type: ignore[attr-defined]
            closed.set()

        server.task_dispatcher.shutdown(timeout=5)  # type: ignore[attr-defined]
        try:
            server.trigger.pull_trigger(close_all)  # type: ignore[attr-defined]
        except OSError:  # the loop already ended and closed it
            return
        closed.wait(5)


def serve(handle: Callable[[Event, Context], Any], port: int, threads: int = 8) -> None:
    """Serve a handler in the foreground (what index.py does under of-watchdog)."""
    from waitress import serve as waitress_serve

    waitress_serve(flask_app(handle), host="127.0.0.1", port=port, threads=threads)
