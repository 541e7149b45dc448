"""The local function provider: the OpenFaaS gateway REST subset, running functions as local processes.

It answers the same routes, bodies and status codes as the CE gateway + faas-netes (docs/openfaas.md
§5), so `faas-cli --gateway http://127.0.0.1:8080` and `OpenFaaSClient` work unchanged. Its parts:
the routes and the async queue worker (local/openfaas_api.py), deployments and their persistence
(local/deployments.py), the `process` runtime (local/processes.py) and the `container` runtime
(local/containers.py). This module holds what ties them: deploy, start on demand, call, idle-stop.

Basic auth is the stack's own random password (secret `basic-auth-password`: `customscripts up`
writes it to `.state/secrets/basic-auth-password`, mode 0600); with no password configured every
/system call is refused.

A deployment is a `FunctionDeployment` body. Its code is the build context `functions/<name>/`
(faas/build.py renders script versions and the stack's platform functions there), run exactly as its
image runs it: the deployment's `fprocess` (`python index.py`) in the context's root, by the
interpreter of a venv holding only the context's requirements (local/venvs.py), with only the
deployment's environment variables and its secrets as files. A file, requirement or variable missing
from what an image would get therefore fails here too; a function that cannot start is answered with
the reason its process gave. The function process starts on its first call (cold start), is stopped after
`function_idle_s` without calls, and is restarted on the next call if it crashed. Deployments are
persisted in `state_dir/provider/functions.json`, so a provider restart keeps them.

Every function also has its own loopback address, as a Kubernetes Service gives every function one
inside the cluster: the port is fixed at deploy and the FunctionStatus names it in the annotation
`com.customscripts.local.service-port`. Platform callers (registry-fn, the scheduler) invoke a
running function there without the gateway hop and fall back to /function/<name> when nothing
answers (not started yet, or idle-stopped); the function's own activity file tells the idle reaper
about those direct calls. A deployment that brings that annotation itself is a service: served on
that port, started at deploy (and provider start), never idle-stopped, restarted when it exits.
gateway-fn is deployed this way: script functions reach it by its Service address, never through
the gateway (deploy/k8s/networkpolicy.yml).

Differences from faas-netes, on purpose: POST of an existing name answers 500 exactly like
faas-netes (its Deployment create fails), not 409; replicas is always 1 and availableReplicas is 1
only while the process runs (scale to zero is the local cold-start model); the image is recorded but
never pulled; read-only root fs and limits are enforced by the sandbox, not by this process.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from customscripts import logs, metrics
from customscripts.config import settings
from customscripts.faas.build import context_sha256
from customscripts.http import ClientConnection, HandlerServer
from customscripts.local.deployments import (
    DeployError,
    DeploymentStore,
    function_status,
    kind,
    now_rfc3339,
    service_port,
    validate_deployment,
)
from customscripts.local.openfaas_api import AsyncQueue, GatewayFront
from customscripts.local.processes import (
    FunctionProcess,
    FunctionStartError,
    ProcessRuntime,
    Runtime,
    choose_runtime,
    free_port,
    kill,
    port_taken,
)
from customscripts.local.venvs import Environments

log = logs.get("customscripts.local.provider")

MAX_BODY = 64 << 20
PROXY_MAX_INFLIGHT = 4096
PROXY_IDLE_TIMEOUT_S = 300.0


@dataclass
class UpstreamResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    duration: float


class Provider:
    """Deployments, function processes and the HTTP front end of the local provider."""

    def __init__(self, host: str | None = None, port: int | None = None, *, state_dir: Path | None = None,
                 functions_dir: Path | None = None, idle_s: float | None = None, user: str | None = None,
                 password: str | None = None, secrets: Mapping[str, str] | None = None,
                 max_functions: int | None = None, upstream_timeout: float = 60.0,
                 start_timeout: float = 30.0, async_workers: int = 2, runtime: str | None = None) -> None:
        cfg = settings()
        self.host = host or cfg.provider_host
        self.port = cfg.provider_port if port is None else port
        self.state_dir = (state_dir or cfg.state_dir) / "provider"
        self.functions_dir = functions_dir or cfg.functions_dir
        self.idle_s = float(cfg.function_idle_s if idle_s is None else idle_s)
        self.user = cfg.openfaas_user if user is None else user
        # the stack's own random password (customscripts up); empty: /system stays closed to everyone
        self.password = cfg.openfaas_password if password is None else password
        self.secrets = dict(secrets) if secrets is not None else {
            "invocation-secret": cfg.invocation_secret,
            "jwt-secret": cfg.jwt_secret,
            "execution-token-secret": cfg.execution_token_secret,
            "basic-auth-user": cfg.openfaas_user,
            "basic-auth-password": cfg.openfaas_password,
        }
        self.max_functions = max_functions
        self.upstream_timeout = upstream_timeout
        self.runtime = choose_runtime(runtime or cfg.provider_runtime)
        self.state_key = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:8]
        self.launcher = self._launcher(start_timeout)
        self._lock = threading.RLock()
        self._start_locks: dict[str, threading.Lock] = {}
        self.store = DeploymentStore(self.state_dir)
        self.deployments: dict[str, dict[str, Any]] = self.store.load()
        self.processes: dict[str, FunctionProcess] = {}
        self.async_queue = AsyncQueue(self, async_workers)
        self._stopping = threading.Event()
        self._server: HandlerServer | None = None
        self.health: metrics.Health | None = None
        self._threads: list[threading.Thread] = []

    def _launcher(self, start_timeout: float) -> Runtime:
        common = {"host": self.host, "state_dir": self.state_dir, "secrets": self.secrets,
                  "start_timeout": start_timeout}
        if self.runtime == "container":
            from customscripts.local.containers import ContainerRuntime

            return ContainerRuntime(**common, state_key=self.state_key)
        # shared by every provider of this state folder (tests start their own): made once per requirements
        cfg = settings()
        environments = Environments(cfg.state_dir / "venvs", wheelhouse=cfg.state_dir / "wheelhouse")
        return ProcessRuntime(**common, environments=environments)

    def _save(self) -> None:
        self.store.save(self.deployments)

    # ------------------------------------------------------------------ deployments

    def function_port(self, name: str) -> int:
        """The function's own loopback port: the one it asked for, else one chosen at deploy."""
        with self._lock:
            entry = self.deployments[name]
            fixed = service_port(entry["spec"])
            if fixed is not None:
                return fixed
            if not entry.get("port"):
                entry["port"] = free_port(self.host)
                self._save()
            return int(entry["port"])

    def source_dir(self, spec: Mapping[str, Any]) -> Path:
        return self.functions_dir / spec["service"]

    def _check_source(self, spec: Mapping[str, Any]) -> None:
        """The build context must be there, as the image must exist before OpenFaaS deploys it."""
        folder = self.source_dir(spec)
        missing = [rel for rel in ("index.py", "function/handler.py") if not (folder / rel).is_file()]
        if missing:
            raise DeployError(f"build context for {spec['service']} not found: no {' or '.join(missing)} in "
                              f"{folder} (render it with customscripts.faas.build first)")
        for name in spec.get("secrets") or []:
            if name not in self.secrets and not (self.state_dir / "secrets" / name).is_file():
                raise DeployError(f"Required secret '{name}' was not found")

    def deploy(self, body: Any, *, create: bool) -> int:
        spec = validate_deployment(body)
        name = spec["service"]
        self._check_source(spec)
        with self._lock:
            exists = name in self.deployments
            if create and exists:
                # faas-netes: creating the Kubernetes Deployment fails for an existing name -> 500.
                raise DeployError(f"unable create Deployment: deployments.apps \"{name}\" already exists", 500)
            if not create and not exists:
                raise DeployError(f"deployment not found: {name}", 404)
            if create and self.max_functions is not None and len(self.deployments) >= self.max_functions:
                raise DeployError(f"unable to create function, maximum: {self.max_functions}")
            previous = self.deployments.get(name)
            self.deployments[name] = {
                "spec": spec,
                "createdAt": previous["createdAt"] if previous else now_rfc3339(),
                "invocationCount": previous.get("invocationCount", 0) if previous else 0,
                "port": (previous.get("port") if previous else None) or free_port(self.host),
            }
            self._save()
            changed = previous is not None and previous["spec"] != spec
            running = self.processes.get(name)
            if running is not None and running.context != context_sha256(self.source_dir(spec)):
                changed = True  # the same deployment of new code (a new image under the same tag)
        if changed:
            self.stop_function(name)  # the next call starts the new code
        logs.event(log, "function deployed", function=name, image=spec["image"], created=create)
        if service_port(spec) is not None and self._server is not None:
            self._keep_services()
        return 202

    def remove(self, body: Any) -> int:
        if not isinstance(body, dict) or not isinstance(body.get("functionName"), str) or not body["functionName"]:
            raise DeployError("functionName: is required")
        name = body["functionName"]
        with self._lock:
            if name not in self.deployments:
                raise DeployError(f"function {name} not found", 404)
            del self.deployments[name]
            self._save()
        self.stop_function(name)
        shutil.rmtree(self.launcher.run_dir(name), ignore_errors=True)
        logs.event(log, "function removed", function=name)
        return 202

    def status(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self.deployments.get(name)
            if entry is None:
                return None
            fp = self.processes.get(name)
            running = fp is not None and fp.alive()
            return function_status(name, entry, running=running, service_address=self._service_address(entry),
                                   metrics_port=fp.metrics_port if fp is not None else 0)

    def _service_address(self, entry: Mapping[str, Any]) -> str:
        """The loopback port callers may reach the function at directly; none for a container that
        has no network (it is reached through the gateway's /function/ route only)."""
        if not self.launcher.direct_address(entry["spec"]):
            return ""
        return str(service_port(entry["spec"]) or entry.get("port") or "")

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(self.deployments)
        return [s for s in (self.status(n) for n in names) if s is not None]

    def running(self) -> list[str]:
        with self._lock:
            return sorted(n for n, fp in self.processes.items() if fp.alive())

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, spec: dict[str, Any]) -> FunctionProcess:
        gateway = self.deployments.get("gateway-fn")
        return self.launcher.start(name, spec, self.source_dir(spec).resolve(), port=self.function_port(name),
                                   gateway_port=service_port(gateway["spec"]) if gateway else None)

    def ensure_running(self, name: str) -> FunctionProcess:
        """The running process for a deployed function, starting (or restarting) it if needed."""
        fp = self.processes.get(name)
        if fp is not None and fp.alive():
            return fp
        with self._lock:
            lock = self._start_locks.setdefault(name, threading.Lock())
        with lock:
            fp = self.processes.get(name)
            if fp is not None and fp.alive():
                return fp
            if fp is not None:
                logs.event(log, "function exited; restarting", logging.WARNING, function=name,
                           code=fp.proc.returncode)
                fp.close_pool()
            with self._lock:
                entry = self.deployments.get(name)
            if entry is None:
                raise KeyError(name)
            try:
                fp = self._start(name, entry["spec"])
            except FunctionStartError as exc:
                if service_port(entry["spec"]) is not None or not port_taken(exc):
                    raise
                with self._lock:  # its port was taken meanwhile: it gets another (callers re-read it)
                    entry["port"] = free_port(self.host)
                    self._save()
                fp = self._start(name, entry["spec"])
            with self._lock:
                if name not in self.deployments:  # removed while starting
                    kill(fp.proc)
                    raise KeyError(name)
                self.processes[name] = fp
            return fp

    def stop_function(self, name: str, *, idle_for: float | None = None) -> bool:
        """`idle_for`: only if unused that long, decided under the lock `_acquire` takes a process under
        (the reaper never kills one a call just picked). A start of it waits until the old one is gone."""
        with self._lock:
            start_lock = self._start_locks.setdefault(name, threading.Lock())
        with start_lock:
            with self._lock:
                fp = self.processes.get(name)
                if fp is None or (idle_for is not None and (fp.inflight or time.monotonic() - fp.last_used < idle_for)):
                    return False
                del self.processes[name]
            fp.close_pool()
            kill(fp.proc)
            self.launcher.stopped(name)
        logs.event(log, "function stopped", function=name, pid=fp.proc.pid)
        return True

    def _services(self) -> list[str]:
        with self._lock:
            return [n for n, e in self.deployments.items() if service_port(e["spec"]) is not None]

    def _keep_services(self) -> None:
        """Start every deployment with a service port that is not running (a Service has endpoints)."""
        for name in self._services():
            fp = self.processes.get(name)
            if fp is not None and fp.alive():
                continue
            try:
                self.ensure_running(name)
            except KeyError:  # removed meanwhile
                continue
            except Exception as exc:  # e.g. the port is taken: retried on the next tick
                logs.event(log, "service function failed to start", logging.ERROR, function=name,
                           error=str(exc))

    def _services_running(self) -> None:
        """Readiness: every deployment with a service port (gateway-fn) has a running process."""
        with self._lock:
            down = [n for n in self._services() if not (n in self.processes and self.processes[n].alive())]
        if down:
            raise RuntimeError(f"not running: {', '.join(sorted(down))}")

    def counts(self) -> dict[str, dict[str, int]]:
        """Deployed and running functions by kind (platform, script): the provider's function gauges."""
        out = {"deployed": {"platform": 0, "script": 0}, "running": {"platform": 0, "script": 0}}
        with self._lock:
            for name, entry in self.deployments.items():
                out["deployed"][kind(entry["spec"])] += 1
                fp = self.processes.get(name)
                if fp is not None and fp.alive():
                    out["running"][kind(entry["spec"])] += 1
        return out

    def _called_directly_s(self, name: str) -> float:
        """Seconds since the function last served a call that bypassed this gateway (its own record)."""
        try:
            return time.time() - self.launcher.activity_file(name).stat().st_mtime
        except OSError:
            return float("inf")

    def _reap_idle(self) -> None:
        """Stop idle functions (not services) and keep services running."""
        interval = max(0.05, min(1.0, self.idle_s / 4))
        while not self._stopping.wait(interval):
            with self._lock:  # a first look; stop_function decides again under the lock
                idle = [n for n, fp in self.processes.items() if not fp.inflight and service_port(fp.spec) is None
                        and min(time.monotonic() - fp.last_used, self._called_directly_s(n)) >= self.idle_s]
            for name in idle:
                fp = self.processes.get(name)
                if fp is not None and self.stop_function(name, idle_for=self.idle_s):
                    metrics.PROVIDER_IDLE_STOPS.labels(kind(fp.spec)).inc()
            self._keep_services()

    # ------------------------------------------------------------------ invocation

    def call(self, name: str, method: str, target: str, headers: list[tuple[str, str]],
             body: bytes) -> UpstreamResult:
        """Send one request to the function process (cold-starting it), retrying once on a dead socket."""
        start = time.perf_counter()
        for attempt in (1, 2):
            fp = self._acquire(name)
            conn: ClientConnection | None = None
            try:
                conn = fp.connection(self.upstream_timeout)
                send_body = body if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS") else None
                status, rheaders, data, will_close = conn.request(method, target, headers, send_body, host=False)
                result = UpstreamResult(status, rheaders, data, time.perf_counter() - start)
                if will_close:
                    conn.close()
                else:
                    fp.release(conn)
                return result
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as exc:
                if conn is not None:
                    conn.close()
                nothing_sent = isinstance(exc, ConnectionRefusedError)
                if fp.exited():
                    # It died. If the request reached it, it may be what killed it: answer 500 rather
                    # than run it twice; the next call restarts the function.
                    fp.close_pool()
                    logs.event(log, "function process exited", logging.WARNING, function=name,
                               code=fp.proc.returncode)
                    if not nothing_sent or attempt == 2:
                        raise
                elif attempt == 2:
                    raise
                # a stale keep-alive socket (or a refused connect): one fresh try, restarting if dead
                logs.event(log, "function connection failed; retrying", logging.DEBUG, function=name,
                           error=str(exc))
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            finally:
                with self._lock:
                    fp.inflight, fp.last_used = fp.inflight - 1, time.monotonic()
        raise AssertionError("unreachable")

    def _acquire(self, name: str) -> FunctionProcess:
        """The running process, counted in use under the lock the idle reaper decides under."""
        while True:
            fp = self.ensure_running(name)
            with self._lock:
                if self.processes.get(name) is fp:
                    fp.inflight, fp.last_used = fp.inflight + 1, time.monotonic()
                    return fp

    def count_invocation(self, name: str) -> None:
        with self._lock:
            entry = self.deployments.get(name)
            if entry is not None:
                entry["invocationCount"] = entry.get("invocationCount", 0) + 1

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Provider:
        """Bind and serve in background threads (tests and embedding); returns self."""
        # Calls nest (registry-fn -> script function -> gateway-fn all come back through here), so
        # the number of requests in flight is not capped here: each function process caps its own.
        server = HandlerServer(GatewayFront(self, self.async_queue), self.host, self.port,
                               threads=PROXY_MAX_INFLIGHT, idle_timeout=PROXY_IDLE_TIMEOUT_S, backlog=256,
                               max_body=MAX_BODY, name="provider", with_peer=True)
        self._server = server
        self.port = server.port
        threads = [threading.Thread(target=server.serve_forever, name="provider-http", daemon=True),
                   threading.Thread(target=self._reap_idle, name="provider-idle", daemon=True),
                   *self.async_queue.threads(self._stopping)]
        self.health = metrics.register("provider", {"service functions": self._services_running})
        metrics.watch_provider(self)
        self._keep_services()
        for thread in threads:
            thread.start()
        self._threads = threads
        logs.event(log, "provider listening", url=self.url, functions=len(self.deployments))
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        for name in list(self.processes):
            self.stop_function(name)
        self.launcher.close()
        with self._lock:
            if self.deployments:
                self._save()  # keeps invocation counts

    def __enter__(self) -> Provider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the provider in the foreground until SIGINT/SIGTERM; stops every function it started."""
    cfg = settings()
    parser = argparse.ArgumentParser(prog="customscripts provider", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=cfg.provider_host)
    parser.add_argument("--port", type=int, default=cfg.provider_port)
    parser.add_argument("--functions-dir", type=Path, default=None,
                        help="where build contexts are rendered (default: CS_FUNCTIONS_DIR, else functions/)")
    parser.add_argument("--idle", type=float, default=cfg.function_idle_s, help="seconds before an idle stop")
    parser.add_argument("--max-functions", type=int, default=None, help="hard cap, like CE's 15")
    args = parser.parse_args(argv)
    logs.setup()
    if not cfg.openfaas_password:  # run on its own, outside `customscripts up`: same per-stack secret
        from customscripts.local.stack import ensure_stack_secrets

        ensure_stack_secrets(cfg)
    provider = Provider(args.host, args.port, functions_dir=args.functions_dir, idle_s=args.idle,
                        max_functions=args.max_functions)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    provider.start()
    try:
        done.wait()
    finally:
        provider.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
