"""The local provider's HTTP front end: the OpenFaaS gateway REST routes (docs/openfaas.md §5) and the
queue worker behind /async-function.

  /system/functions        GET list, POST create (202), PUT update (202/404), DELETE (202/404)  basic auth
  /system/function/{name}  GET FunctionStatus                                                   basic auth
  /system/info, /system/namespaces                                                              basic auth
  /function/{name}[/path]  any method, proxied to the function process (X-Call-Id, X-Start-Time)
  /async-function/{name}   POST -> 202, run in the background, result POSTed to X-Callback-Url
  /healthz, /readyz, /metrics  the provider's own health and metrics (customscripts/metrics.py)

Served by `HandlerServer` (a thread per keep-alive connection, no per-request header parsing through
the email package). Status codes and bodies are the CE gateway's and faas-netes', so `faas-cli` and
`OpenFaaSClient` work unchanged.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from customscripts import logs, metrics
from customscripts.errors import DomainError
from customscripts.http import Headers, RawResponse, parse_json
from customscripts.local.deployments import NAMESPACE, DeployError
from customscripts.local.processes import FunctionStartError

if TYPE_CHECKING:
    from customscripts.local.provider import Provider

log = logs.get("customscripts.local.openfaas_api")

PROVIDER_NAME = "customscripts-local"
VERSION = "0.1.0"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "content-length"})
ASYNC_QUEUE_SIZE = 10000


def basic_auth_ok(header: str | None, user: str, password: str) -> bool:
    """Basic auth for /system, as the OpenFaaS gateway checks it: this user and password exactly
    (compared in constant time). Without a configured password nothing is authorised."""
    if not password or not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, sep, given_password = base64.b64decode(token.strip(), validate=True).partition(b":")
    except ValueError:  # binascii.Error
        return False
    user_ok = hmac.compare_digest(given_user, user.encode())
    return bool(sep) and hmac.compare_digest(given_password, password.encode()) and user_ok


def split_name(segment: str) -> str | None:
    """`name` or `name.openfaas-fn`; any other namespace is unknown here (CE has one)."""
    name, _, namespace = segment.partition(".")
    if namespace and namespace != NAMESPACE:
        return None
    return name


@dataclass
class Call:
    """One request to the provider, as the front end sees it."""

    method: str
    path: str
    query: str
    headers: Headers
    header_list: list[tuple[str, str]]
    body: bytes
    peer: str


def reply(status: int, body: bytes | str = b"", headers: list[tuple[str, str]] | None = None,
          content_type: str | None = "text/plain; charset=utf-8") -> RawResponse:
    """A response: hop-by-hop headers dropped, a Content-Type unless one is given (or 204/304)."""
    data = body.encode() if isinstance(body, str) else body
    out = [(k, v) for k, v in headers or [] if k.lower() not in HOP_BY_HOP]
    if content_type and status not in (204, 304) and not any(k.lower() == "content-type" for k, _ in out):
        out.append(("Content-Type", content_type))
    return status, out, data


def json_reply(status: int, obj: Any) -> RawResponse:
    return reply(status, json.dumps(obj), content_type="application/json")


@dataclass
class AsyncJob:
    name: str
    call_id: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    callback: str | None


class AsyncQueue:
    """The queue worker: /async-function calls run in the background, each result POSTed to its
    X-Callback-Url with the headers OpenFaaS's queue-worker sends."""

    def __init__(self, provider: Provider, workers: int) -> None:
        self.provider = provider
        self.workers = workers
        self._q: queue.Queue[AsyncJob] = queue.Queue(maxsize=ASYNC_QUEUE_SIZE)
        self._callbacks = requests.Session()

    def put(self, job: AsyncJob) -> bool:
        """False when the queue is full."""
        try:
            self._q.put_nowait(job)
        except queue.Full:
            return False
        return True

    def threads(self, stopping: threading.Event) -> list[threading.Thread]:
        return [threading.Thread(target=self._work, args=(stopping,), name=f"provider-async-{i}", daemon=True)
                for i in range(self.workers)]

    def _work(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                job = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            token = logs.call_id_var.set(job.call_id)
            try:
                self._run(job)
            finally:
                logs.call_id_var.reset(token)

    def _run(self, job: AsyncJob) -> None:
        name = job.name
        try:
            result = self.provider.call(name, "POST", job.target, job.headers, job.body)
            self.provider.count_invocation(name)
            status, rbody, rheaders, duration = result.status, result.body, result.headers, result.duration
        except Exception as exc:
            logs.event(log, "async invocation failed", logging.WARNING, function=name, error=str(exc))
            status, rbody, rheaders, duration = 500, str(exc).encode(), [], 0.0
        logs.event(log, "async invocation done", function=name, status=status)
        if not job.callback:
            return
        cb_headers = {
            "X-Call-Id": job.call_id,
            "X-Duration-Seconds": f"{duration:.6f}",
            "X-Function-Status": str(status),
            "X-Function-Name": name,
            "User-Agent": f"queue-worker/{PROVIDER_NAME}-{VERSION}",
        }
        ctype = next((v for k, v in rheaders if k.lower() == "content-type"), None)
        if ctype:
            cb_headers["Content-Type"] = ctype
        try:
            self._callbacks.post(job.callback, data=rbody, headers=cb_headers, timeout=30)
        except requests.RequestException as exc:
            logs.event(log, "callback failed", logging.WARNING, function=name, url=job.callback, error=str(exc))


class GatewayFront:
    """The provider's HTTP front end: the gateway routes, served by `HandlerServer`."""

    def __init__(self, provider: Provider, async_queue: AsyncQueue) -> None:
        self.provider = provider
        self.async_queue = async_queue

    def __call__(self, method: str, target: str, header_list: list[tuple[str, str]], body: bytes,
                 peer: str) -> RawResponse:
        url = urlsplit(target)
        call = Call(method, url.path, url.query, Headers(header_list), header_list, body, peer)
        path = url.path
        try:
            if path == "/healthz":
                if method in ("GET", "HEAD"):
                    return reply(200, "OK")
                return reply(405, "Method Not Allowed\n")
            if path in ("/metrics", "/readyz") and self.provider.health is not None:
                return metrics.ops_response(self.provider.health, method, path)  # type: ignore[return-value]
            if path.startswith("/function/"):
                return self._counted("sync", self._invoke(call, path[len("/function/"):]))
            if path.startswith("/async-function/"):
                return self._counted("async", self._invoke_async(call, path[len("/async-function/"):]))
            if path.startswith("/system/"):
                denied = self._unauthorised(call)
                return denied if denied is not None else self._system(call)
            return reply(404, "404 page not found\n")
        except DeployError as exc:
            return reply(exc.status, str(exc) + "\n")
        except Exception as exc:  # never let one request take the server down
            log.exception("provider error on %s %s", method, path)
            return reply(500, f"internal error: {exc}\n")

    @staticmethod
    def _counted(kind: str, answer: RawResponse) -> RawResponse:
        metrics.PROVIDER_INVOCATIONS.labels(kind, str(answer[0])).inc()
        return answer

    def _unauthorised(self, call: Call) -> RawResponse | None:
        if basic_auth_ok(call.headers.get("Authorization"), self.provider.user, self.provider.password):
            return None
        return reply(401, "Unauthenticated\n", [("WWW-Authenticate", 'Basic realm="Restricted"')])

    def _system(self, call: Call) -> RawResponse:
        p = self.provider
        method, path, body = call.method, call.path, call.body
        if path == "/system/functions":
            if method == "GET":
                return json_reply(200, p.list())
            if method in ("POST", "PUT", "DELETE"):
                try:
                    payload = parse_json(body) if body.strip() else None
                except DomainError as exc:
                    raise DeployError(f"unable to unmarshal request: {exc.message}") from None
                if method == "DELETE":
                    return reply(p.remove(payload))
                return reply(p.deploy(payload, create=method == "POST"))
        elif path.startswith("/system/function/") and method == "GET":
            name = split_name(path[len("/system/function/"):])
            status = p.status(name) if name else None
            if status is None:
                return reply(404, f"function {name} not found\n")
            return json_reply(200, status)
        elif path == "/system/info" and method == "GET":
            return json_reply(200, {
                "provider": {"provider": PROVIDER_NAME, "orchestration": p.runtime,
                             "version": {"release": VERSION, "sha": "local", "commit_message": ""}},
                "version": {"release": VERSION, "sha": "local", "commit_message": ""},
                "arch": os.uname().machine,
            })
        elif path == "/system/namespaces" and method == "GET":
            return json_reply(200, [NAMESPACE])
        else:
            return reply(404, "404 page not found\n")
        return reply(405, "Method Not Allowed\n")

    @staticmethod
    def _route(rest: str, query: str) -> tuple[str | None, str]:
        segment, slash, sub = rest.partition("/")
        name = split_name(segment)
        target = "/" + sub if slash else "/"
        if query:
            target += "?" + query
        return name, target

    @staticmethod
    def _forward_headers(call: Call, call_id: str, start_time: str) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in call.header_list
                   if k.lower() not in HOP_BY_HOP and k.lower() not in ("x-call-id", "x-start-time", "expect")]
        headers.append(("X-Call-Id", call_id))
        headers.append(("X-Start-Time", start_time))
        if call.headers.get("X-Forwarded-For") is None:
            headers.append(("X-Forwarded-For", call.peer))
        if call.headers.get("X-Forwarded-Host") is None and call.headers.get("Host"):
            headers.append(("X-Forwarded-Host", call.headers["Host"]))
        return headers

    def _invoke(self, call: Call, rest: str) -> RawResponse:
        p = self.provider
        name, target = self._route(rest, call.query)
        call_id = call.headers.get("X-Call-Id") or str(uuid.uuid4())
        start_time = str(time.time_ns())
        ids = [("X-Call-Id", call_id), ("X-Start-Time", start_time), ("X-OpenFaaS-Internal", "proxy")]
        if not name or name not in p.deployments:
            return reply(404, f"error finding function {name}: not found\n", ids)
        token = logs.call_id_var.set(call_id)
        try:
            result = p.call(name, call.method, target, self._forward_headers(call, call_id, start_time), call.body)
        except KeyError:
            return reply(404, f"error finding function {name}: not found\n", ids)
        except TimeoutError:
            return reply(504, f"Upstream timed out for: {name}\n", ids)
        except FunctionStartError as exc:  # OpenFaaS answers so while the pod crash-loops; plus the reason
            logs.event(log, "function cannot start", logging.ERROR, function=name, error=exc.reason)
            return reply(500, f"Can't reach service for: {name}. {exc.reason}\n", ids)
        except Exception as exc:
            logs.event(log, "function unreachable", logging.WARNING, function=name, error=str(exc))
            return reply(500, f"Can't reach service for: {name}.\n", ids)
        finally:
            logs.call_id_var.reset(token)
        p.count_invocation(name)
        headers = [(k, v) for k, v in result.headers if k.lower() not in ("x-call-id", "x-start-time")]
        headers += [("X-Call-Id", call_id), ("X-Start-Time", start_time),
                    ("X-Duration-Seconds", f"{result.duration:.6f}"),
                    ("X-Served-By", f"{PROVIDER_NAME}/{VERSION}")]
        fallback = call.headers.get("Content-Type") or "text/plain"
        return reply(result.status, result.body, headers, content_type=fallback)

    def _invoke_async(self, call: Call, rest: str) -> RawResponse:
        if call.method != "POST":
            return reply(405, "Method Not Allowed\n")
        name, target = self._route(rest, call.query)
        call_id = call.headers.get("X-Call-Id") or str(uuid.uuid4())
        start_time = str(time.time_ns())
        ids = [("X-Call-Id", call_id), ("X-Start-Time", start_time)]
        if not name or name not in self.provider.deployments:
            return reply(404, f"error finding function {name}: not found\n", [*ids, ("X-OpenFaaS-Internal", "proxy")])
        callback = call.headers.get("X-Callback-Url")
        if callback:
            parts = urlsplit(callback)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                return reply(400, f"X-Callback-Url is not a valid URL: {callback}\n", ids)
        headers = [(k, v) for k, v in self._forward_headers(call, call_id, start_time)
                   if k.lower() != "x-callback-url"]
        if not self.async_queue.put(AsyncJob(name, call_id, target, headers, call.body, callback)):
            return reply(500, "async queue is full\n", ids)
        return reply(202, b"", ids)
