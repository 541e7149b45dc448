"""python3-http entrypoint: Flask app served by waitress on 127.0.0.1:5000 behind of-watchdog."""

from __future__ import annotations

import os

from flask import Flask, request
from function import handler
from waitress import serve

app = Flask(__name__)


class Event:
    def __init__(self) -> None:
        self.body = request.get_data()
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class Context:
    def __init__(self) -> None:
        self.hostname = os.getenv("HOSTNAME", "localhost")


def format_response(res: object) -> tuple:
    if res is None:
        return ("", 200)
    if isinstance(res, dict):
        status = res.get("statusCode", 200)
        headers = res.get("headers") or {}
        return (res.get("body", ""), status, headers)
    return (res, 200)


@app.route("/", defaults={"path": ""}, methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
@app.route("/<path:path>", methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
def call_handler(path: str) -> tuple:
    return format_response(handler.handle(Event(), Context()))


if __name__ == "__main__":
    handler.warm()
    serve(app, host="127.0.0.1", port=int(os.getenv("CS_FUNCTION_PORT", "5000")),
          threads=int(os.getenv("CS_FUNCTION_THREADS", "4")))
