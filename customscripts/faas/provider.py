"""The local function provider: the OpenFaaS gateway REST subset, running functions as local processes.

It answers the same routes, bodies and status codes as the CE gateway + faas-netes (docs/openfaas.md
§5), so `faas-cli --gateway http://127.0.0.1:8080` and `OpenFaaSClient` work unchanged:

  /system/functions        GET list, POST create (202), PUT update (202/404), DELETE (202/404)  basic auth
  /system/function/{name}  GET FunctionStatus                                                   basic auth
  /system/info, /system/namespaces                                                              basic auth
  /function/{name}[/path]  any method, proxied to the function process (X-Call-Id, X-Start-Time)
  /async-function/{name}   POST -> 202, run in the background, result POSTed to X-Callback-Url
  /healthz, /readyz, /metrics  the provider's own health and metrics (customscripts/metrics.py)

Basic auth is the stack's own random password (secret `basic-auth-password`: `customscripts up`
writes it to `.state/secrets/basic-auth-password`, mode 0600); with no password configured every
/system call is refused.

A deployment is a `FunctionDeployment` body. Its code is the build context `functions/<name>/`
(faas/build.py renders script versions and the stack's platform functions there), run exactly as its
image runs it: the deployment's `fprocess` (`python index.py`) in the context's root, by the
interpreter of a venv holding only the context's requirements (faas/venvs.py), with only the
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
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import queue
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from customscripts import logs, metrics
from customscripts.config import settings
from customscripts.errors import DomainError
from customscripts.faas import cpugroups
from customscripts.faas.build import LABEL as LABEL_PREFIX
from customscripts.faas.build import TENANT_ANNOTATION, context_sha256
from customscripts.faas.naming import SERVICE_PORT_ANNOTATION, is_dns1123, label_value
from customscripts.faas.venvs import EnvironmentBuildFailed, Environments
from customscripts.http import ClientConnection, HandlerServer, Headers, KeepAlivePool, RawResponse, parse_json

log = logs.get("customscripts.faas.provider")

# the loopback port of a running function's ops listener (/metrics, /healthz, /readyz: customscripts/metrics.py),
# named in its FunctionStatus as the Service port is; a pod's is CS_FN_METRICS_PORT (prometheus.io/port)
METRICS_PORT_ANNOTATION = "com.customscripts.local.metrics-port"

PROVIDER_NAME = "customscripts-local"
VERSION = "0.1.0"
NAMESPACE = "openfaas-fn"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "content-length"})
# A function process gets the deployment's envVars and these, nothing of the provider's environment
# (as a container gets only its image's and its deployment's): secrets only as files, the ones it lists.
BASE_ENV = {"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
_STR_MAPS = ("envVars", "labels", "annotations")
_STR_LISTS = ("secrets", "constraints")
RUNTIMES = ("process", "container")
MAX_BODY = 64 << 20
PROXY_MAX_INFLIGHT = 4096
UPSTREAM_POOL_SIZE = 64  # idle keep-alive connections kept per function process
PROXY_IDLE_TIMEOUT_S = 300.0


class FunctionStartError(RuntimeError):
    """A function process exited (or never listened) before serving: `reason` is the last line it wrote."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"function {name} failed to start: {reason}")
        self.reason = reason


class DeployError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_deployment(body: Any) -> dict[str, Any]:
    """Check a FunctionDeployment the way faas-netes does (400 on anything malformed)."""
    if not isinstance(body, dict):
        raise DeployError("request body must be a FunctionDeployment JSON object")
    service = body.get("service")
    if not isinstance(service, str) or not service:
        raise DeployError("service: is required")
    if not is_dns1123(service):
        raise DeployError(f"(\"{service}\") must be a valid DNS entry for service name")
    if not isinstance(body.get("image"), str) or not body["image"]:
        raise DeployError("image: is required")
    namespace = body.get("namespace") or ""
    if namespace not in ("", NAMESPACE):
        raise DeployError(f"namespace must be: {NAMESPACE}")
    for key in _STR_MAPS:
        value = body.get(key)
        if value is not None and (not isinstance(value, dict)
                                  or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise DeployError(f"{key}: must be a map of strings")
    for key in _STR_LISTS:
        value = body.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise DeployError(f"{key}: must be a list of strings")
    for key in ("limits", "requests"):
        value = body.get(key)
        if value is not None and (not isinstance(value, dict)
                                  or not all(isinstance(v, str) for v in value.values())):
            raise DeployError(f"{key}: must be an object of strings")
    for key in ("envProcess",):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise DeployError(f"{key}: must be a string")
    if body.get("readOnlyRootFilesystem") is not None and not isinstance(body["readOnlyRootFilesystem"], bool):
        raise DeployError("readOnlyRootFilesystem: must be a boolean")
    for key, value in (body.get("labels") or {}).items():
        if label_value(value) != value:
            raise DeployError(f"label {key}: value {value!r} is not a valid label value (<= 63 chars)")
    clean = {k: v for k, v in body.items() if v is not None}
    clean["namespace"] = NAMESPACE
    return clean


# --------------------------------------------------------------------------- function processes


@dataclass
class FunctionProcess:
    """One running function: its process, loopback port and a pool of keep-alive connections."""

    name: str
    proc: subprocess.Popen
    port: int
    spec: dict[str, Any]
    started_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0
    unix_path: str | None = None  # a container without a network serves on this socket file
    context: str = ""  # the build context's hash it was started from (a new one restarts it)
    metrics_port: int = 0  # its ops listener (0: none, e.g. a container without a network)
    forwards: list[Any] = field(default_factory=list)  # its socket files to its peers (containers.SocketForward)
    pool: KeepAlivePool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = KeepAlivePool("127.0.0.1", self.port, maxsize=UPSTREAM_POOL_SIZE, unix_path=self.unix_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connection(self, timeout: float) -> ClientConnection:
        return self.pool.checkout(timeout, timeout)[0]

    def release(self, conn: ClientConnection) -> None:
        self.pool.release(conn)

    def close_pool(self) -> None:
        self.pool.close()
        for forward in self.forwards:
            forward.close()
        self.forwards.clear()


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
        self.start_timeout = start_timeout
        self.runtime = self._choose_runtime(runtime or cfg.provider_runtime)
        self.state_key = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:8]
        # shared by every provider of this state folder (tests start their own): made once per requirements
        self.environments = Environments(cfg.state_dir / "venvs", wheelhouse=cfg.state_dir / "wheelhouse")
        self._cpu_groups: dict[str, Path | None] = {}
        self._cpu_groups_warned = False
        self._lock = threading.RLock()
        self._start_locks: dict[str, threading.Lock] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.processes: dict[str, FunctionProcess] = {}
        self._async_q: queue.Queue = queue.Queue(maxsize=10000)
        self._async_workers = async_workers
        self._stopping = threading.Event()
        self._server: HandlerServer | None = None
        self.health: metrics.Health | None = None
        self._threads: list[threading.Thread] = []
        self._callbacks = requests.Session()
        self._load()

    @staticmethod
    def _choose_runtime(wanted: str) -> str:
        """`container` where a container engine can run one here, else `process`, said once, clearly."""
        if wanted not in RUNTIMES:
            raise ValueError(f"CS_PROVIDER_RUNTIME must be one of {', '.join(RUNTIMES)}, not {wanted!r}")
        if wanted == "container":
            from customscripts.faas import images

            status = images.probe()
            if not status.usable:
                logs.event(log, "container runtime unavailable: functions run as processes", logging.WARNING,
                           reason=status.reason)
                print(f"[provider] container runtime unavailable ({status.reason}); functions run as local "
                      "processes from their build contexts", file=sys.stderr)
                return "process"
        return wanted

    def authorised(self, header: str | None) -> bool:
        """Basic auth for /system, as the OpenFaaS gateway checks it: this user and password exactly
        (compared in constant time). Without a configured password nothing is authorised."""
        if not self.password or not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except ValueError:  # binascii.Error
            return False
        user_ok = hmac.compare_digest(user, self.user.encode())
        return bool(sep) and hmac.compare_digest(password, self.password.encode()) and user_ok

    # ------------------------------------------------------------------ persistence

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "functions.json"

    def _load(self) -> None:
        try:
            data = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return
        self.deployments = {name: entry for name, entry in data.get("functions", {}).items()
                            if isinstance(entry, dict) and "spec" in entry}

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"functions": self.deployments}, indent=1, sort_keys=True))
        os.replace(tmp, self._state_file)

    # ------------------------------------------------------------------ deployments

    @staticmethod
    def service_port(spec: Mapping[str, Any]) -> int | None:
        """The port a deployment asked to be served on (a service: always running), if any."""
        raw = (spec.get("annotations") or {}).get(SERVICE_PORT_ANNOTATION)
        return int(raw) if raw else None

    def function_port(self, name: str) -> int:
        """The function's own loopback port: the one it asked for, else one chosen at deploy."""
        with self._lock:
            entry = self.deployments[name]
            fixed = self.service_port(entry["spec"])
            if fixed is not None:
                return fixed
            if not entry.get("port"):
                entry["port"] = _free_port(self.host)
                self._save()
            return int(entry["port"])

    def _activity_file(self, name: str) -> Path:
        return self.state_dir / "run" / name / "last-request"

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
                "createdAt": previous["createdAt"] if previous else _now_rfc3339(),
                "invocationCount": previous.get("invocationCount", 0) if previous else 0,
                "port": (previous.get("port") if previous else None) or _free_port(self.host),
            }
            self._save()
            changed = previous is not None and previous["spec"] != spec
            running = self.processes.get(name)
            if running is not None and running.context != context_sha256(self.source_dir(spec)):
                changed = True  # the same deployment of new code (a new image under the same tag)
        if changed:
            self.stop_function(name)  # the next call starts the new code
        logs.event(log, "function deployed", function=name, image=spec["image"], created=create)
        if self.service_port(spec) is not None and self._server is not None:
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
        shutil.rmtree(self.state_dir / "run" / name, ignore_errors=True)
        logs.event(log, "function removed", function=name)
        return 202

    def status(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self.deployments.get(name)
            if entry is None:
                return None
            spec = entry["spec"]
            fp = self.processes.get(name)
            running = fp is not None and fp.alive()
            return {
                "name": name,
                "image": spec["image"],
                "namespace": NAMESPACE,
                "envProcess": spec.get("envProcess", ""),
                "envVars": spec.get("envVars") or {},
                "constraints": spec.get("constraints") or [],
                "secrets": spec.get("secrets") or [],
                "labels": spec.get("labels") or {},
                "annotations": {**(spec.get("annotations") or {}),
                                SERVICE_PORT_ANNOTATION: self._service_address(spec, entry),
                                **({METRICS_PORT_ANNOTATION: str(fp.metrics_port)}
                                   if running and fp is not None and fp.metrics_port else {})},
                "limits": spec.get("limits"),
                "requests": spec.get("requests"),
                "readOnlyRootFilesystem": bool(spec.get("readOnlyRootFilesystem", False)),
                "invocationCount": entry.get("invocationCount", 0),
                "replicas": 1,
                "availableReplicas": 1 if running else 0,
                "createdAt": entry["createdAt"],
            }

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(self.deployments)
        return [s for s in (self.status(n) for n in names) if s is not None]

    def running(self) -> list[str]:
        with self._lock:
            return sorted(n for n, fp in self.processes.items() if fp.alive())

    # ------------------------------------------------------------------ processes

    def _secrets_dir(self, name: str, spec: Mapping[str, Any]) -> Path:
        """Materialise the function's secrets as files in a private folder (its /var/openfaas/secrets)."""
        folder = self.state_dir / "run" / name / "secrets"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder.parent, 0o700)
        for secret in spec.get("secrets") or []:
            value = self.secrets.get(secret)
            if value is None:
                value = (self.state_dir / "secrets" / secret).read_text()
            path = folder / secret
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(value)
        return folder

    def _env(self, name: str, spec: Mapping[str, Any], secrets_dir: Path, python: Path) -> dict[str, str]:
        run_dir = self.state_dir / "run" / name
        env = {
            **BASE_ENV,
            "PATH": f"{python.parent}:{SYSTEM_PATH}",
            "HOME": str(run_dir),
            **(spec.get("envVars") or {}),
            "fprocess": spec.get("envProcess") or "python index.py",
            "CS_SECRETS_DIR": str(secrets_dir),
            "CS_FUNCTION_NAME": name,
            "HOSTNAME": name,
            # many functions share this host's loopback: each ops listener on a free port, named in its status
            "CS_FN_METRICS_PORT": "0",
            "CS_FN_METRICS_ADDR": self.host,
        }
        if spec.get("readOnlyRootFilesystem"):
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing is written next to the code
        return env

    def _argv(self, spec: Mapping[str, Any], python: Path) -> list[str]:
        """The deployment's fprocess, its `python` being the function's venv interpreter."""
        argv = shlex.split(spec.get("envProcess") or "python index.py")
        if not argv or argv[0] not in ("python", "python3"):
            raise FunctionStartError(spec["service"], f"fprocess {spec.get('envProcess')!r} does not start python")
        return [str(python), *argv[1:]]

    def _start(self, name: str, spec: dict[str, Any]) -> FunctionProcess:
        folder = self.source_dir(spec).resolve()
        if self.runtime == "container":
            return self._start_container(name, spec, folder)
        try:
            python = self.environments.python_for(folder)
        except EnvironmentBuildFailed as exc:
            raise FunctionStartError(name, str(exc)) from exc
        secrets_dir = self._secrets_dir(name, spec)
        env = self._env(name, spec, secrets_dir, python)
        rfd, wfd = os.pipe()
        env["CS_FN_READY_FD"] = str(wfd)
        env["CS_FN_PORT"] = str(self.function_port(name))
        activity = self._activity_file(name)
        activity.parent.mkdir(parents=True, exist_ok=True)
        activity.touch()
        env["CS_FN_ACTIVITY_FILE"] = str(activity)
        logdir = self.state_dir.parent / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        tenant = (spec.get("annotations") or {}).get(TENANT_ANNOTATION)
        if tenant:  # a script function: it shares its tenant's CPU weight with the tenant's others
            group = self._cpu_group(str(tenant))
            if group is not None:
                env["CS_CPU_GROUP"] = str(group)
        argv = self._argv(spec, python)
        started = time.monotonic()
        logpath = logdir / f"fn-{name}.log"
        with open(logpath, "ab") as logfile:
            log_start = logfile.tell()
            proc = subprocess.Popen(argv, cwd=str(folder), env=env, stdin=subprocess.DEVNULL, stdout=logfile,
                                    stderr=subprocess.STDOUT, pass_fds=(wfd,), start_new_session=True)
        os.close(wfd)
        try:
            port, metrics_port = self._await_port(proc, rfd, name, logpath, log_start)
        finally:
            os.close(rfd)
        self._cold_started(spec, started)
        logs.event(log, "function started", function=name, pid=proc.pid, port=port, metrics_port=metrics_port,
                   cold_start_ms=round((time.monotonic() - started) * 1000, 1))
        return FunctionProcess(name=name, proc=proc, port=port, spec=spec, context=context_sha256(folder),
                               metrics_port=metrics_port)

    @staticmethod
    def _kind(spec: Mapping[str, Any]) -> str:
        """platform or script (a bounded metric label, never the function's name)."""
        return "platform" if (spec.get("labels") or {}).get(f"{LABEL_PREFIX}.kind") == "platform" else "script"

    def _cold_started(self, spec: Mapping[str, Any], started: float) -> None:
        metrics.PROVIDER_COLD_STARTS.labels(self._kind(spec)).inc()
        metrics.PROVIDER_COLD_START_SECONDS.labels(self._kind(spec)).observe(time.monotonic() - started)

    def _start_container(self, name: str, spec: dict[str, Any], folder: Path) -> FunctionProcess:
        """The function as a container of its image (faas/containers.py): a script function without a
        network, serving on a socket file and reaching gateway-fn through another; a platform function
        on the host's loopback, as under the process runtime."""
        from customscripts.faas import containers, images
        from customscripts.faas.builder import BuildFailed, PodmanBuilder

        engine = images.require_engine()
        image = spec["image"]
        if _image_context(engine, image) != context_sha256(folder):  # missing, or built from other code
            try:
                PodmanBuilder(engine).build(folder, image)
            except BuildFailed as exc:
                raise FunctionStartError(name, f"image {image} could not be built: {exc}") from exc
        secrets_dir = self._secrets_dir(name, spec)
        for path in (secrets_dir, *secrets_dir.iterdir()):  # the container's non-root user reads them
            os.chmod(path, 0o755 if path.is_dir() else 0o444)  # (run/<name>/ stays private on the host)
        env = {**(spec.get("envVars") or {}), "fprocess": spec.get("envProcess") or "python index.py",
               "CS_FUNCTION_NAME": name, "HOSTNAME": name, "PYTHONUNBUFFERED": "1",
               "CS_FN_METRICS_PORT": "-1"}  # no ops listener: nothing on the host could reach it
        platform = (spec.get("labels") or {}).get(f"{LABEL_PREFIX}.kind") == "platform"
        socket_dir: Path | None = None
        forwards: list[Any] = []
        shared: tuple[Path, ...] = ()
        if platform:
            env["CS_FN_LISTEN"] = f"127.0.0.1:{self.function_port(name)}"
            if env.get("CS_FUNCTIONS_DIR"):  # registry-fn renders build contexts where the provider reads them
                shared = (Path(env["CS_FUNCTIONS_DIR"]),)
                shared[0].mkdir(parents=True, exist_ok=True)
                owner = containers.image_user(engine, image)
                if owner is not None:
                    os.chown(shared[0], *owner)
        else:
            socket_dir = self.state_dir / "run" / name / "sockets"
            shutil.rmtree(socket_dir, ignore_errors=True)
            socket_dir.mkdir(parents=True)
            os.chmod(socket_dir, 0o777)  # the function's user creates its socket here
            env["CS_FN_LISTEN"] = f"unix:{containers.SOCKET_DIR}/{containers.FUNCTION_SOCKET}"
            gateway = settings().data_gateway_url
            if env.get("CS_GATEWAY_URL") in ("", gateway) and self._gateway_port() is not None:
                sock = socket_dir / "gateway-fn.sock"
                forwards.append(containers.SocketForward(sock, "127.0.0.1", self._gateway_port() or 0))
                env["CS_GATEWAY_URL"] = "http+unix://" + quote(f"{containers.SOCKET_DIR}/{sock.name}", safe="")
        containers.remove_container(engine, self.state_key, name)
        argv = containers.run_argv(engine, name=name, image=image, spec=spec, env=env, secrets_dir=secrets_dir,
                                   socket_dir=socket_dir, state_key=self.state_key, shared_dirs=shared)
        logdir = self.state_dir.parent / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        logpath = logdir / f"fn-{name}.log"
        started = time.monotonic()
        with open(logpath, "ab") as logfile:
            log_start = logfile.tell()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        unix_path = str(socket_dir / containers.FUNCTION_SOCKET) if socket_dir is not None else None
        port = 0 if unix_path else self.function_port(name)
        try:
            self._await_listening(proc, name, unix_path, port, logpath, log_start)
        except BaseException:
            for forward in forwards:
                forward.close()
            containers.remove_container(engine, self.state_key, name)
            raise
        self._cold_started(spec, started)
        logs.event(log, "function started", function=name, pid=proc.pid, image=image, runtime="container",
                   address=unix_path or port, cold_start_ms=round((time.monotonic() - started) * 1000, 1))
        return FunctionProcess(name=name, proc=proc, port=port, spec=spec, unix_path=unix_path, forwards=forwards,
                               context=context_sha256(folder))

    def _service_address(self, spec: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
        """The loopback port callers may reach the function at directly; none for a container that
        has no network (it is reached through the gateway's /function/ route only)."""
        if self.runtime == "container" and (spec.get("labels") or {}).get(f"{LABEL_PREFIX}.kind") != "platform":
            return ""
        return str(self.service_port(spec) or entry.get("port") or "")

    def _gateway_port(self) -> int | None:
        entry = self.deployments.get("gateway-fn")
        return self.service_port(entry["spec"]) if entry else None

    def _await_listening(self, proc: subprocess.Popen, name: str, unix_path: str | None, port: int,
                         logpath: Path, log_start: int) -> None:
        """Until the container's server accepts a connection (its process exiting first is a failure)."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            family = socket.AF_UNIX if unix_path else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                with contextlib.suppress(OSError):
                    probe.connect(unix_path if unix_path else (self.host, port))
                    return
            time.sleep(0.02)
        self._kill(proc)
        raise FunctionStartError(name, _last_line(logpath, log_start)
                                 or f"exit {proc.poll()} with no output (see {logpath})")

    def _cpu_group(self, tenant: str) -> Path | None:
        """The tenant's CPU group (faas/cpugroups.py); None, said once, where it cannot be made."""
        if tenant not in self._cpu_groups:
            group = cpugroups.tenant_group(tenant, settings().tenant_cpu_shares)
            if group is None and not self._cpu_groups_warned:
                self._cpu_groups_warned = True
                logs.event(log, "per-tenant CPU groups unavailable (no writable cgroup cpu controller): script "
                                "functions share the CPU without a per-tenant bound", logging.WARNING)
            self._cpu_groups[tenant] = group
        return self._cpu_groups[tenant]

    def _await_port(self, proc: subprocess.Popen, rfd: int, name: str, logpath: Path, log_start: int
                    ) -> tuple[int, int]:
        """The ports the function writes once it listens: served, then its ops listener's (faas/runner.py)."""
        deadline = time.monotonic() + self.start_timeout
        data = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([rfd], [], [], 0.05)
            if ready:
                chunk = os.read(rfd, 64)
                data += chunk
                if data.endswith(b"\n"):
                    ports = [int(p) for p in data.split()]
                    return ports[0], (ports[1] if len(ports) > 1 else 0)
                if not chunk:  # writer closed without a port: the process failed to start
                    break
            if proc.poll() is not None:
                break
        self._kill(proc)
        raise FunctionStartError(name, _last_line(logpath, log_start)
                                 or f"exit {proc.poll()} with no output (see {logpath})")

    @staticmethod
    def _kill(proc: subprocess.Popen, grace: float = 3.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the function and its sandbox children
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

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
                if self.service_port(entry["spec"]) is not None or not _port_taken(exc):
                    raise
                with self._lock:  # its port was taken meanwhile: it gets another (callers re-read it)
                    entry["port"] = _free_port(self.host)
                    self._save()
                fp = self._start(name, entry["spec"])
            with self._lock:
                if name not in self.deployments:  # removed while starting
                    self._kill(fp.proc)
                    raise KeyError(name)
                self.processes[name] = fp
            return fp

    def stop_function(self, name: str) -> bool:
        with self._lock:
            fp = self.processes.pop(name, None)
        if fp is None:
            return False
        fp.close_pool()
        self._kill(fp.proc)
        if self.runtime == "container":
            from customscripts.faas import containers, images

            containers.remove_container(images.require_engine(), self.state_key, name)
        logs.event(log, "function stopped", function=name, pid=fp.proc.pid)
        return True

    def _keep_services(self) -> None:
        """Start every deployment with a service port that is not running (a Service has endpoints)."""
        with self._lock:
            wanted = [n for n, e in self.deployments.items() if self.service_port(e["spec"]) is not None]
        for name in wanted:
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
            wanted = [n for n, e in self.deployments.items() if self.service_port(e["spec"]) is not None]
            down = [n for n in wanted if not (n in self.processes and self.processes[n].alive())]
        if down:
            raise RuntimeError(f"not running: {', '.join(sorted(down))}")

    def counts(self) -> dict[str, dict[str, int]]:
        """Deployed and running functions by kind (platform, script): the provider's function gauges."""
        out = {"deployed": {"platform": 0, "script": 0}, "running": {"platform": 0, "script": 0}}
        with self._lock:
            for name, entry in self.deployments.items():
                kind = self._kind(entry["spec"])
                out["deployed"][kind] += 1
                fp = self.processes.get(name)
                if fp is not None and fp.alive():
                    out["running"][kind] += 1
        return out

    def _called_directly_s(self, name: str) -> float:
        """Seconds since the function last served a call that bypassed this gateway (its own record)."""
        try:
            return time.time() - self._activity_file(name).stat().st_mtime
        except OSError:
            return float("inf")

    def _reap_idle(self) -> None:
        """Stop idle functions (not services) and keep services running."""
        interval = max(0.05, min(1.0, self.idle_s / 4))
        while not self._stopping.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [n for n, fp in self.processes.items()
                        if fp.inflight == 0 and now - fp.last_used >= self.idle_s
                        and self.service_port(fp.spec) is None and self._called_directly_s(n) >= self.idle_s]
            for name in idle:
                logs.event(log, "function idle; stopping", function=name)
                fp = self.processes.get(name)
                if fp is not None and self.stop_function(name):
                    metrics.PROVIDER_IDLE_STOPS.labels(self._kind(fp.spec)).inc()
            self._keep_services()

    # ------------------------------------------------------------------ invocation

    def call(self, name: str, method: str, target: str, headers: list[tuple[str, str]],
             body: bytes) -> UpstreamResult:
        """Send one request to the function process (cold-starting it), retrying once on a dead socket."""
        start = time.perf_counter()
        for attempt in (1, 2):
            fp = self.ensure_running(name)
            fp.inflight += 1
            fp.last_used = time.monotonic()
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
                if self._exited(fp):
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
                fp.inflight -= 1
                fp.last_used = time.monotonic()
        raise AssertionError("unreachable")

    @staticmethod
    def _exited(fp: FunctionProcess, wait: float = 0.1) -> bool:
        """Whether the process is gone; a process whose socket just dropped gets a moment to exit."""
        try:
            fp.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return False
        return True

    def count_invocation(self, name: str) -> None:
        with self._lock:
            entry = self.deployments.get(name)
            if entry is not None:
                entry["invocationCount"] = entry.get("invocationCount", 0) + 1

    def _async_worker(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._async_q.get(timeout=0.5)
            except queue.Empty:
                continue
            name, call_id, method, target, headers, body, callback = job
            token = logs.call_id_var.set(call_id)
            try:
                try:
                    result = self.call(name, method, target, headers, body)
                    self.count_invocation(name)
                    status, rbody, rheaders, duration = result.status, result.body, result.headers, result.duration
                except Exception as exc:
                    logs.event(log, "async invocation failed", logging.WARNING, function=name, error=str(exc))
                    status, rbody, rheaders, duration = 500, str(exc).encode(), [], 0.0
                logs.event(log, "async invocation done", function=name, status=status)
                if callback:
                    cb_headers = {
                        "X-Call-Id": call_id,
                        "X-Duration-Seconds": f"{duration:.6f}",
                        "X-Function-Status": str(status),
                        "X-Function-Name": name,
                        "User-Agent": f"queue-worker/{PROVIDER_NAME}-{VERSION}",
                    }
                    ctype = next((v for k, v in rheaders if k.lower() == "content-type"), None)
                    if ctype:
                        cb_headers["Content-Type"] = ctype
                    try:
                        self._callbacks.post(callback, data=rbody, headers=cb_headers, timeout=30)
                    except requests.RequestException as exc:
                        logs.event(log, "callback failed", logging.WARNING, function=name, url=callback,
                                   error=str(exc))
            finally:
                logs.call_id_var.reset(token)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Provider:
        """Bind and serve in background threads (tests and embedding); returns self."""
        # Calls nest (registry-fn -> script function -> gateway-fn all come back through here), so
        # the number of requests in flight is not capped here: each function process caps its own.
        server = HandlerServer(_Front(self), self.host, self.port, threads=PROXY_MAX_INFLIGHT,
                               idle_timeout=PROXY_IDLE_TIMEOUT_S, backlog=256, max_body=MAX_BODY,
                               name="provider", with_peer=True)
        self._server = server
        self.port = server.port
        threads = [threading.Thread(target=server.serve_forever, name="provider-http", daemon=True),
                   threading.Thread(target=self._reap_idle, name="provider-idle", daemon=True)]
        threads += [threading.Thread(target=self._async_worker, name=f"provider-async-{i}", daemon=True)
                    for i in range(self._async_workers)]
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
        if self.runtime == "container":  # and any a killed predecessor left
            from customscripts.faas import containers, images

            containers.remove_containers(images.require_engine(), self.state_key)
        with self._lock:
            if self.deployments:
                self._save()  # keeps invocation counts

    def __enter__(self) -> Provider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- HTTP front end


def _image_context(engine: Any, image: str) -> str | None:
    """The build context an image was built from (its com.customscripts.context-sha256 label)."""
    done = subprocess.run(engine.command("image", "inspect", "--format",
                                         '{{index .Labels "com.customscripts.context-sha256"}}', image),
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _last_line(path: Path, offset: int) -> str:
    """The last line a function process wrote to its log since `offset` (its reason for failing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            tail = fh.read()[-8192:]
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _port_taken(exc: FunctionStartError) -> bool:
    return "Address already in use" in exc.reason


def _free_port(host: str) -> int:
    """A port nothing listens on now (the function binds it when it starts)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _split_name(segment: str) -> str | None:
    """`name` or `name.openfaas-fn`; any other namespace is unknown here (CE has one)."""
    name, _, namespace = segment.partition(".")
    if namespace and namespace != NAMESPACE:
        return None
    return name


@dataclass
class _Call:
    """One request to the provider, as the front end sees it."""

    method: str
    path: str
    query: str
    headers: Headers
    header_list: list[tuple[str, str]]
    body: bytes
    peer: str


def _reply(status: int, body: bytes | str = b"", headers: list[tuple[str, str]] | None = None,
           content_type: str | None = "text/plain; charset=utf-8") -> RawResponse:
    """A response: hop-by-hop headers dropped, a Content-Type unless one is given (or 204/304)."""
    data = body.encode() if isinstance(body, str) else body
    out = [(k, v) for k, v in headers or [] if k.lower() not in HOP_BY_HOP]
    if content_type and status not in (204, 304) and not any(k.lower() == "content-type" for k, _ in out):
        out.append(("Content-Type", content_type))
    return status, out, data


def _json_reply(status: int, obj: Any) -> RawResponse:
    return _reply(status, json.dumps(obj), content_type="application/json")


class _Front:
    """The provider's HTTP front end: the gateway routes, served by `HandlerServer` (a thread per
    keep-alive connection, no per-request header parsing through the email package)."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    def __call__(self, method: str, target: str, header_list: list[tuple[str, str]], body: bytes,
                 peer: str) -> RawResponse:
        url = urlsplit(target)
        call = _Call(method, url.path, url.query, Headers(header_list), header_list, body, peer)
        path = url.path
        try:
            if path == "/healthz":
                if method in ("GET", "HEAD"):
                    return _reply(200, "OK")
                return _reply(405, "Method Not Allowed\n")
            if path in ("/metrics", "/readyz") and self.provider.health is not None:
                return metrics.ops_response(self.provider.health, method, path)  # type: ignore[return-value]
            if path.startswith("/function/"):
                return self._counted("sync", self._invoke(call, path[len("/function/"):]))
            if path.startswith("/async-function/"):
                return self._counted("async", self._invoke_async(call, path[len("/async-function/"):]))
            if path.startswith("/system/"):
                denied = self._unauthorised(call)
                return denied if denied is not None else self._system(call)
            return _reply(404, "404 page not found\n")
        except DeployError as exc:
            return _reply(exc.status, str(exc) + "\n")
        except Exception as exc:  # never let one request take the server down
            log.exception("provider error on %s %s", method, path)
            return _reply(500, f"internal error: {exc}\n")

    @staticmethod
    def _counted(kind: str, reply: RawResponse) -> RawResponse:
        metrics.PROVIDER_INVOCATIONS.labels(kind, str(reply[0])).inc()
        return reply

    def _unauthorised(self, call: _Call) -> RawResponse | None:
        if self.provider.authorised(call.headers.get("Authorization")):
            return None
        return _reply(401, "Unauthenticated\n", [("WWW-Authenticate", 'Basic realm="Restricted"')])

    def _system(self, call: _Call) -> RawResponse:
        p = self.provider
        method, path, body = call.method, call.path, call.body
        if path == "/system/functions":
            if method == "GET":
                return _json_reply(200, p.list())
            if method in ("POST", "PUT", "DELETE"):
                try:
                    payload = parse_json(body) if body.strip() else None
                except DomainError as exc:
                    raise DeployError(f"unable to unmarshal request: {exc.message}") from None
                if method == "DELETE":
                    return _reply(p.remove(payload))
                return _reply(p.deploy(payload, create=method == "POST"))
        elif path.startswith("/system/function/") and method == "GET":
            name = _split_name(path[len("/system/function/"):])
            status = p.status(name) if name else None
            if status is None:
                return _reply(404, f"function {name} not found\n")
            return _json_reply(200, status)
        elif path == "/system/info" and method == "GET":
            return _json_reply(200, {
                "provider": {"provider": PROVIDER_NAME, "orchestration": self.provider.runtime,
                             "version": {"release": VERSION, "sha": "local", "commit_message": ""}},
                "version": {"release": VERSION, "sha": "local", "commit_message": ""},
                "arch": os.uname().machine,
            })
        elif path == "/system/namespaces" and method == "GET":
            return _json_reply(200, [NAMESPACE])
        else:
            return _reply(404, "404 page not found\n")
        return _reply(405, "Method Not Allowed\n")

    @staticmethod
    def _route(rest: str, query: str) -> tuple[str | None, str]:
        segment, slash, sub = rest.partition("/")
        name = _split_name(segment)
        target = "/" + sub if slash else "/"
        if query:
            target += "?" + query
        return name, target

    @staticmethod
    def _forward_headers(call: _Call, call_id: str, start_time: str) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in call.header_list
                   if k.lower() not in HOP_BY_HOP and k.lower() not in ("x-call-id", "x-start-time", "expect")]
        headers.append(("X-Call-Id", call_id))
        headers.append(("X-Start-Time", start_time))
        if call.headers.get("X-Forwarded-For") is None:
            headers.append(("X-Forwarded-For", call.peer))
        if call.headers.get("X-Forwarded-Host") is None and call.headers.get("Host"):
            headers.append(("X-Forwarded-Host", call.headers["Host"]))
        return headers

    def _invoke(self, call: _Call, rest: str) -> RawResponse:
        p = self.provider
        name, target = self._route(rest, call.query)
        call_id = call.headers.get("X-Call-Id") or str(uuid.uuid4())
        start_time = str(time.time_ns())
        ids = [("X-Call-Id", call_id), ("X-Start-Time", start_time), ("X-OpenFaaS-Internal", "proxy")]
        if not name or name not in p.deployments:
            return _reply(404, f"error finding function {name}: not found\n", ids)
        token = logs.call_id_var.set(call_id)
        try:
            result = p.call(name, call.method, target, self._forward_headers(call, call_id, start_time), call.body)
        except KeyError:
            return _reply(404, f"error finding function {name}: not found\n", ids)
        except TimeoutError:
            return _reply(504, f"Upstream timed out for: {name}\n", ids)
        except FunctionStartError as exc:  # OpenFaaS answers so while the pod crash-loops; plus the reason
            logs.event(log, "function cannot start", logging.ERROR, function=name, error=exc.reason)
            return _reply(500, f"Can't reach service for: {name}. {exc.reason}\n", ids)
        except Exception as exc:
            logs.event(log, "function unreachable", logging.WARNING, function=name, error=str(exc))
            return _reply(500, f"Can't reach service for: {name}.\n", ids)
        finally:
            logs.call_id_var.reset(token)
        p.count_invocation(name)
        headers = [(k, v) for k, v in result.headers if k.lower() not in ("x-call-id", "x-start-time")]
        headers += [("X-Call-Id", call_id), ("X-Start-Time", start_time),
                    ("X-Duration-Seconds", f"{result.duration:.6f}"),
                    ("X-Served-By", f"{PROVIDER_NAME}/{VERSION}")]
        fallback = call.headers.get("Content-Type") or "text/plain"
        return _reply(result.status, result.body, headers, content_type=fallback)

    def _invoke_async(self, call: _Call, rest: str) -> RawResponse:
        p = self.provider
        if call.method != "POST":
            return _reply(405, "Method Not Allowed\n")
        name, target = self._route(rest, call.query)
        call_id = call.headers.get("X-Call-Id") or str(uuid.uuid4())
        start_time = str(time.time_ns())
        ids = [("X-Call-Id", call_id), ("X-Start-Time", start_time)]
        if not name or name not in p.deployments:
            return _reply(404, f"error finding function {name}: not found\n", [*ids, ("X-OpenFaaS-Internal", "proxy")])
        callback = call.headers.get("X-Callback-Url")
        if callback:
            parts = urlsplit(callback)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                return _reply(400, f"X-Callback-Url is not a valid URL: {callback}\n", ids)
        headers = [(k, v) for k, v in self._forward_headers(call, call_id, start_time)
                   if k.lower() != "x-callback-url"]
        try:
            p._async_q.put_nowait((name, call_id, "POST", target, headers, call.body, callback))
        except queue.Full:
            return _reply(500, "async queue is full\n", ids)
        return _reply(202, b"", ids)


# --------------------------------------------------------------------------- CLI


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
        from customscripts.localstack import ensure_stack_secrets

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
