"""The local provider's function processes: one running function, and the `process` runtime that starts
it from its build context exactly as its image runs it.

The deployment's `fprocess` (`python index.py`) runs in the context's root, by the interpreter of a venv
holding only the context's requirements (local/venvs.py), with only the deployment's environment
variables and its secrets as files; a script function joins its tenant's CPU group (faas/cpugroups.py).
A file, requirement or variable missing from what an image would get therefore fails here too, and a
function that cannot start is answered with the reason its process gave (the last line it wrote).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from customscripts import logs, metrics
from customscripts.config import settings
from customscripts.faas import cpugroups
from customscripts.faas.build import TENANT_ANNOTATION, context_sha256
from customscripts.http import ClientConnection, KeepAlivePool
from customscripts.local.deployments import kind
from customscripts.local.venvs import EnvironmentBuildFailed, Environments

log = logs.get("customscripts.local.processes")

# A function process gets the deployment's envVars and these, nothing of the provider's environment
# (as a container gets only its image's and its deployment's): secrets only as files, the ones it lists.
BASE_ENV = {"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_FPROCESS = "python index.py"
UPSTREAM_POOL_SIZE = 64  # idle keep-alive connections kept per function process
RUNTIMES = ("process", "container")


class FunctionStartError(RuntimeError):
    """A function process exited (or never listened) before serving: `reason` is the last line it wrote."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"function {name} failed to start: {reason}")
        self.reason = reason


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

    def exited(self, wait: float = 0.1) -> bool:
        """Whether the process is gone; a process whose socket just dropped gets a moment to exit."""
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return False
        return True

    def connection(self, timeout: float) -> ClientConnection:
        return self.pool.checkout(timeout, timeout)[0]

    def release(self, conn: ClientConnection) -> None:
        self.pool.release(conn)

    def close_pool(self) -> None:
        self.pool.close()
        for forward in self.forwards:
            forward.close()
        self.forwards.clear()


def last_line(path: Path, offset: int) -> str:
    """The last line a function process wrote to its log since `offset` (its reason for failing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            tail = fh.read()[-8192:]
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def port_taken(exc: FunctionStartError) -> bool:
    return "Address already in use" in exc.reason


def free_port(host: str) -> int:
    """A port nothing listens on now (the function binds it when it starts)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def kill(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM to the function's whole session (it and its sandbox children), SIGKILL after `grace`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def choose_runtime(wanted: str) -> str:
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


def cold_started(spec: Mapping[str, Any], started: float) -> None:
    metrics.PROVIDER_COLD_STARTS.labels(kind(spec)).inc()
    metrics.PROVIDER_COLD_START_SECONDS.labels(kind(spec)).observe(time.monotonic() - started)


class Runtime:
    """What both runtimes share: the function's run folder, its secrets as files, its log."""

    name = "process"

    def __init__(self, *, host: str, state_dir: Path, secrets: Mapping[str, str], start_timeout: float) -> None:
        self.host = host
        self.state_dir = state_dir  # <state>/provider
        self.secrets = secrets
        self.start_timeout = start_timeout

    def run_dir(self, name: str) -> Path:
        return self.state_dir / "run" / name

    def activity_file(self, name: str) -> Path:
        """Where the function records calls that bypassed the gateway (faas/runner.py), for the idle reaper."""
        return self.run_dir(name) / "last-request"

    def log_path(self, name: str) -> Path:
        logdir = self.state_dir.parent / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        return logdir / f"fn-{name}.log"

    def secrets_dir(self, name: str, spec: Mapping[str, Any]) -> Path:
        """Materialise the function's secrets as files in a private folder (its /var/openfaas/secrets)."""
        folder = self.run_dir(name) / "secrets"
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

    def failed(self, proc: subprocess.Popen, name: str, logpath: Path, log_start: int) -> FunctionStartError:
        """Stop what did not come up; the error names the last line it wrote."""
        kill(proc)
        return FunctionStartError(name, last_line(logpath, log_start)
                                  or f"exit {proc.poll()} with no output (see {logpath})")

    def direct_address(self, spec: Mapping[str, Any]) -> bool:
        """Whether callers may reach the function on its loopback port (the Service address)."""
        return True

    def stopped(self, name: str) -> None:
        """After the function's process was killed (a container runtime removes its container)."""

    def close(self) -> None:
        """When the provider stops."""


class ProcessRuntime(Runtime):
    """Each function a local process from its build context, in a venv of its own requirements."""

    def __init__(self, *, host: str, state_dir: Path, secrets: Mapping[str, str], start_timeout: float,
                 environments: Environments, cpu_shares: int | None = None) -> None:
        super().__init__(host=host, state_dir=state_dir, secrets=secrets, start_timeout=start_timeout)
        self.environments = environments
        self.cpu_shares = settings().tenant_cpu_shares if cpu_shares is None else cpu_shares
        self._cpu_groups: dict[str, Path | None] = {}
        self._cpu_groups_warned = False
        self._cpu_lock = threading.Lock()

    def _env(self, name: str, spec: Mapping[str, Any], secrets_dir: Path, python: Path) -> dict[str, str]:
        env = {
            **BASE_ENV,
            "PATH": f"{python.parent}:{SYSTEM_PATH}",
            "HOME": str(self.run_dir(name)),
            **(spec.get("envVars") or {}),
            "fprocess": spec.get("envProcess") or DEFAULT_FPROCESS,
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

    @staticmethod
    def _argv(spec: Mapping[str, Any], python: Path) -> list[str]:
        """The deployment's fprocess, its `python` being the function's venv interpreter."""
        argv = shlex.split(spec.get("envProcess") or DEFAULT_FPROCESS)
        if not argv or argv[0] not in ("python", "python3"):
            raise FunctionStartError(spec["service"], f"fprocess {spec.get('envProcess')!r} does not start python")
        return [str(python), *argv[1:]]

    def cpu_group(self, tenant: str) -> Path | None:
        """The tenant's CPU group (faas/cpugroups.py); None, said once, where it cannot be made."""
        with self._cpu_lock:
            if tenant not in self._cpu_groups:
                group = cpugroups.tenant_group(tenant, self.cpu_shares)
                if group is None and not self._cpu_groups_warned:
                    self._cpu_groups_warned = True
                    logs.event(log, "per-tenant CPU groups unavailable (no writable cgroup cpu controller): "
                                    "script functions share the CPU without a per-tenant bound", logging.WARNING)
                self._cpu_groups[tenant] = group
            return self._cpu_groups[tenant]

    def start(self, name: str, spec: dict[str, Any], folder: Path, *, port: int,
              gateway_port: int | None = None) -> FunctionProcess:
        try:
            python = self.environments.python_for(folder)
        except EnvironmentBuildFailed as exc:
            raise FunctionStartError(name, str(exc)) from exc
        env = self._env(name, spec, self.secrets_dir(name, spec), python)
        rfd, wfd = os.pipe()
        env["CS_FN_READY_FD"] = str(wfd)
        env["CS_FN_PORT"] = str(port)
        activity = self.activity_file(name)
        activity.parent.mkdir(parents=True, exist_ok=True)
        activity.touch()
        env["CS_FN_ACTIVITY_FILE"] = str(activity)
        tenant = (spec.get("annotations") or {}).get(TENANT_ANNOTATION)
        if tenant:  # a script function: it shares its tenant's CPU weight with the tenant's others
            group = self.cpu_group(str(tenant))
            if group is not None:
                env["CS_CPU_GROUP"] = str(group)
        argv = self._argv(spec, python)
        started = time.monotonic()
        logpath = self.log_path(name)
        with open(logpath, "ab") as logfile:
            log_start = logfile.tell()
            proc = subprocess.Popen(argv, cwd=str(folder), env=env, stdin=subprocess.DEVNULL, stdout=logfile,
                                    stderr=subprocess.STDOUT, pass_fds=(wfd,), start_new_session=True)
        os.close(wfd)
        try:
            port, metrics_port = self._await_port(proc, rfd, name, logpath, log_start)
        finally:
            os.close(rfd)
        cold_started(spec, started)
        logs.event(log, "function started", function=name, pid=proc.pid, port=port, metrics_port=metrics_port,
                   cold_start_ms=round((time.monotonic() - started) * 1000, 1))
        return FunctionProcess(name=name, proc=proc, port=port, spec=spec, context=context_sha256(folder),
                               metrics_port=metrics_port)

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
        raise self.failed(proc, name, logpath, log_start)
