"""The upstream python3-http template's Flask adapter (openfaas/python-flask-template index.py), kept as
the reference `customscripts.http.HandlerServer` is checked against (tests/unit/test_http_server.py).
Nothing ships it: every function is served by HandlerServer."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from customscripts.http import MAX_REQUEST_BYTES, Context, Event


def flask_app(handle: Callable[[Event, Context], Any]):
    """The python3-http template's index.py, as a function: Flask app calling handle(event, context)."""
    from flask import Flask, jsonify, request

    app = Flask("customscripts-handler")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
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


