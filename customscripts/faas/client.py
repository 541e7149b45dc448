"""A small client for the OpenFaaS gateway REST API (the calls faas-cli makes), minio/redis-py style.

The same client talks to a real OpenFaaS gateway and to the local provider, so the platform's
deploy and invoke code is identical in both. `/system/*` calls go through one keep-alive
`requests.Session` and carry basic auth; invocations (the hot path: every execute) go through a
pooled `http.client` connection (`KeepAlivePool`, ~0.4 ms cheaper per call) and carry no auth
(CE invocation routes are open).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter

from customscripts.config import settings
from customscripts.faas.naming import SERVICE_PORT_ANNOTATION
from customscripts.http import KeepAlivePool, RawReply

NAMESPACE = "openfaas-fn"


class FaasError(Exception):
    """The gateway answered with an unexpected status; `status` and `body` say what it was."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        super().__init__(f"{message} (status {status}): {body[:500]}" if status else message)
        self.status = status
        self.body = body


class FunctionNotFound(FaasError):
    """The named function is not deployed (404 from the gateway/provider, not from the function)."""


class NotListening(FaasError):
    """Nothing accepts connections at a function's own address; the request was not sent."""


class AnswerLost(FaasError):
    """A direct call's connection failed after the request went out: no answer, maybe executed."""


@dataclass
class InvokeResult:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def call_id(self) -> str | None:
        return self.headers.get("X-Call-Id")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def _gateway_missing(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    """A 404 produced by the gateway/provider itself rather than by the function's own routing."""
    if status != 404:
        return False
    return "X-OpenFaaS-Internal" in headers or body.startswith(b"error finding function")


class OpenFaaSClient:
    """`deploy/list/describe/delete/invoke/invoke_async/info/healthz` against one gateway."""

    def __init__(self, base_url: str | None = None, user: str | None = None, password: str | None = None,
                 timeout: float = 30.0, invoke_timeout: float = 65.0) -> None:
        cfg = settings()
        self.base_url = (base_url or cfg.provider_url).rstrip("/")
        self.auth = (user if user is not None else cfg.openfaas_user,
                     password if password is not None else cfg.openfaas_password)
        self.timeout = timeout
        self.invoke_timeout = invoke_timeout
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._pool: KeepAlivePool | None = None
        self._prefix = ""
        self._direct: dict[str, tuple[KeepAlivePool, str]] = {}  # function URL -> its pool
        self._direct_lock = threading.Lock()
        if self.base_url.startswith("http://"):
            self._pool, self._prefix = KeepAlivePool.for_url(self.base_url, maxsize=32)

    def close(self) -> None:
        self.session.close()
        if self._pool is not None:
            self._pool.close()
        for pool, _ in self._direct.values():
            pool.close()

    def __enter__(self) -> OpenFaaSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ system API

    def _system(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, self.base_url + path, auth=self.auth,
                                        timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise FaasError(f"{method} {path} failed: {exc}") from exc

    def deploy(self, spec: Mapping[str, Any]) -> int:
        """Create or update, exactly like `faas-cli deploy`: PUT, then POST when PUT says 404."""
        resp = self._system("PUT", "/system/functions", json=spec)
        if resp.status_code == 404:
            resp = self._system("POST", "/system/functions", json=spec)
        if resp.status_code not in (200, 201, 202):
            raise FaasError(f"deploy {spec.get('service')!r} failed", resp.status_code, resp.text)
        return resp.status_code

    def list(self, namespace: str | None = None) -> list[dict[str, Any]]:
        params = {"namespace": namespace} if namespace else None
        resp = self._system("GET", "/system/functions", params=params)
        if resp.status_code != 200:
            raise FaasError("list functions failed", resp.status_code, resp.text)
        return resp.json() or []

    def describe(self, name: str, namespace: str = "") -> dict[str, Any]:
        resp = self._system("GET", f"/system/function/{name}", params={"namespace": namespace, "usage": "1"})
        if resp.status_code == 404:
            raise FunctionNotFound(f"function {name!r} not found", 404, resp.text)
        if resp.status_code != 200:
            raise FaasError(f"describe {name!r} failed", resp.status_code, resp.text)
        return resp.json()

    def delete(self, name: str, namespace: str = "") -> None:
        body = {"functionName": name, "namespace": namespace}
        resp = self._system("DELETE", "/system/functions", json=body)
        if resp.status_code == 404:
            raise FunctionNotFound(f"function {name!r} not found", 404, resp.text)
        if resp.status_code not in (200, 202):
            raise FaasError(f"delete {name!r} failed", resp.status_code, resp.text)

    def exists(self, name: str) -> bool:
        try:
            self.describe(name)
        except FunctionNotFound:
            return False
        return True

    def info(self) -> dict[str, Any]:
        resp = self._system("GET", "/system/info")
        if resp.status_code != 200:
            raise FaasError("system info failed", resp.status_code, resp.text)
        return resp.json()

    def healthz(self) -> bool:
        try:
            return self.session.get(self.base_url + "/healthz", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthz():
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ invocation

    def invoke(self, name: str, body: bytes | str | None = b"", headers: Mapping[str, str] | None = None,
               path: str = "", method: str = "POST", params: Mapping[str, str] | None = None,
               timeout: float | None = None) -> InvokeResult:
        """Synchronous call to `/function/{name}{path}`; the function's own status is returned as is."""
        route = f"/function/{name}"
        if path:
            route += path if path.startswith("/") else "/" + path
        data = body.encode() if isinstance(body, str) else body
        if self._pool is not None:
            target = self._prefix + route + (f"?{urlencode(params)}" if params else "")
            try:
                reply = self._pool.request(method, target, data, headers, timeout=timeout or self.invoke_timeout)
            except (OSError, http.client.HTTPException) as exc:
                raise FaasError(f"invoke {name!r} failed: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                resp = self.session.request(method, self.base_url + route, data=data, headers=dict(headers or {}),
                                            params=params, timeout=timeout or self.invoke_timeout)
            except requests.RequestException as exc:
                raise FaasError(f"invoke {name!r} failed: {exc}") from exc
            reply = RawReply(resp.status_code, resp.headers, resp.content)  # type: ignore[arg-type]
        if _gateway_missing(reply.status, reply.headers, reply.body):
            raise FunctionNotFound(f"function {name!r} not found", 404, reply.text)
        return InvokeResult(reply.status, reply.body, reply.headers)

    def function_url(self, name: str) -> str | None:
        """A function's own address, for invoking it without the gateway hop: CS_FUNCTION_URL_TEMPLATE
        (its Kubernetes Service), else the loopback port the local provider names in its status,
        else None (only the gateway knows where it runs)."""
        template = settings().function_url_template
        if template:
            return template.format(name=name)
        try:
            port = (self.describe(name).get("annotations") or {}).get(SERVICE_PORT_ANNOTATION)
        except FaasError:
            return None
        host = urlsplit(self.base_url).hostname
        return f"http://{host}:{int(port)}" if port and str(port).isdigit() and host else None

    def invoke_at(self, url: str, body: bytes | str | None, headers: Mapping[str, str] | None = None,
                  timeout: float | None = None) -> InvokeResult:
        """POST to a function's own address (`function_url`). NotListening when nothing listens there
        (not started, idle-stopped or removed: the request was not sent, the gateway route starts or
        redeploys it); AnswerLost when the call failed after it may have reached the function (e.g. it
        was being stopped just then)."""
        with self._direct_lock:
            if url not in self._direct:
                self._direct[url] = KeepAlivePool.for_url(url, maxsize=32)
            pool, prefix = self._direct[url]
        data = body.encode() if isinstance(body, str) else body
        try:
            reply = pool.request("POST", prefix or "/", data, headers, timeout=timeout or self.invoke_timeout)
        except (ConnectionRefusedError, socket.gaierror) as exc:  # nothing there: the request was not sent
            raise NotListening(f"nothing answers at {url}: {exc}") from exc
        except TimeoutError as exc:  # it is there but did not answer in time: no second try
            raise FaasError(f"invoke at {url} timed out: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise AnswerLost(f"invoke at {url} failed: {type(exc).__name__}: {exc}") from exc
        return InvokeResult(reply.status, reply.body, reply.headers)

    def invoke_async(self, name: str, body: bytes | str | None = b"", callback_url: str | None = None,
                     headers: Mapping[str, str] | None = None, path: str = "") -> str:
        """Queue a call on `/async-function/{name}`; returns the call id (202 expected)."""
        url = f"{self.base_url}/async-function/{name}"
        if path:
            url += path if path.startswith("/") else "/" + path
        hdrs = dict(headers or {})
        if callback_url:
            hdrs["X-Callback-Url"] = callback_url
        try:
            resp = self.session.post(url, data=body, headers=hdrs, timeout=self.timeout)
        except requests.RequestException as exc:
            raise FaasError(f"async invoke {name!r} failed: {exc}") from exc
        if _gateway_missing(resp.status_code, resp.headers, resp.content):
            raise FunctionNotFound(f"function {name!r} not found", 404, resp.text)
        if resp.status_code != 202:
            raise FaasError(f"async invoke {name!r} failed", resp.status_code, resp.text)
        return resp.headers.get("X-Call-Id", "")
