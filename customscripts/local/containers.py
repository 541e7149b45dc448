"""The local provider's container runtime (`CS_PROVIDER_RUNTIME=container`): each function runs as a
container of its own image, as a Kubernetes node runs it.

Every container gets (podman, runc; faas/images.py chooses the engine and its flags):

  --read-only --tmpfs /tmp        the image's root is read-only; /tmp is a private tmpfs (readOnlyRootFilesystem)
  --user of the image             the image's non-root user (the Dockerfile's USER)
  --memory, --cpus                the deployment's limits (the tier's function_memory / function_cpu)
  --pids-limit                    a bound on processes, as the kubelet's pod pid limit
  --cap-drop ALL, no-new-privileges
  secrets                         the deployment's secrets, read-only at /var/openfaas/secrets
  --network none (script fns)     no network at all. The function serves on a socket file and reaches
                                  gateway-fn, its one way out, through another socket file, both in one
                                  folder mounted at /run/cs. Chosen over an internal podman network: on a
                                  bridge the host is reachable at the gateway address, so every host service
                                  bound to all interfaces would be reachable too unless firewall rules are
                                  kept in step; with no network the only reachable peer is the socket the
                                  provider puts there, exactly what deploy/k8s's NetworkPolicy allows.
  --network host (platform fns)   registry-fn and gateway-fn are trusted platform code that needs the
                                  databases, as their pods do in the cluster network; they listen on their
                                  loopback port as under the process runtime. registry-fn also gets the
                                  functions folder (CS_FUNCTIONS_DIR) read-write: it renders each version's
                                  build context there, where the provider builds the image from it.

The sandbox's own layers (process isolation: rlimits, seccomp, private /tmp in its own user and mount
namespaces, the import allowlist) still run inside. An image that is missing, or was built from another
build context than the one the deployment now has, is built first (faas/builder.py's PodmanBuilder), as a
node pulls an image before it starts a pod.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from customscripts import logs
from customscripts.config import settings
from customscripts.faas.build import context_sha256
from customscripts.local.deployments import is_platform
from customscripts.local.processes import (
    DEFAULT_FPROCESS,
    FunctionProcess,
    FunctionStartError,
    Runtime,
    cold_started,
)

log = logs.get("customscripts.local.containers")

SOCKET_DIR = "/run/cs"  # in a script function's container: its own socket and its peers'
FUNCTION_SOCKET = "fn.sock"
SECRETS_DIR = "/var/openfaas/secrets"
LABEL = "com.customscripts.local-provider"
PIDS_LIMIT = 512
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([a-zA-Z]*)$")
_MEMORY_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def memory_bytes(quantity: str | None) -> int | None:
    """A Kubernetes memory quantity ("256Mi", "1G", "512000") in bytes; None when absent or unreadable."""
    match = _QUANTITY.match(str(quantity or "").strip())
    if not match or match.group(2) not in _MEMORY_UNITS:
        return None
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def cpus(quantity: str | None) -> float | None:
    """A Kubernetes CPU quantity ("500m", "1", "0.25") in CPUs; None when absent or unreadable."""
    match = _QUANTITY.match(str(quantity or "").strip())
    if not match or match.group(2) not in ("", "m"):
        return None
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "m" else value


def container_name(state_key: str, function: str) -> str:
    return f"cs-local-{state_key}-{function}"[:253]


def image_user(engine: Any, image: str) -> tuple[int, int] | None:
    """The image's numeric `USER uid[:gid]`, None when it names none (root) or a name."""
    done = subprocess.run(engine.command("image", "inspect", "--format", "{{.Config.User}}", image),
                          capture_output=True, text=True, check=False)
    uid, _, gid = done.stdout.strip().partition(":")
    if done.returncode != 0 or not uid.isdigit() or (gid and not gid.isdigit()):
        return None
    return int(uid), int(gid or uid)


def run_argv(engine: Any, *, name: str, image: str, spec: Mapping[str, Any], env: Mapping[str, str],
             secrets_dir: Path, socket_dir: Path | None, state_key: str,
             shared_dirs: tuple[Path, ...] = ()) -> list[str]:
    """`podman run` for one function container (see the module docstring for each layer). `shared_dirs`
    are mounted read-write at their own paths: registry-fn renders the build contexts of the versions it
    publishes into the provider's functions folder, the local stand-in for the bucket a cluster's
    builder reads them from."""
    args = ["--rm", "--name", container_name(state_key, name), "--label", f"{LABEL}={state_key}",
            "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m,mode=1777",
            "--pids-limit", str(PIDS_LIMIT), "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--volume", f"{secrets_dir}:{SECRETS_DIR}:ro"]
    if socket_dir is not None:
        args += ["--network", "none", "--volume", f"{socket_dir}:{SOCKET_DIR}"]
    else:
        args += ["--network", "host"]
    for folder in shared_dirs:
        args += ["--volume", f"{folder}:{folder}"]
    limits = spec.get("limits") or {}
    memory = memory_bytes(limits.get("memory"))
    if memory:
        args += ["--memory", str(memory), "--memory-swap", str(memory)]
    cpu = cpus(limits.get("cpu"))
    if cpu:
        args += ["--cpus", f"{cpu:g}"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    return engine.run_command(*args, image)


def remove_containers(engine: Any, state_key: str) -> None:
    """Remove every container this provider's state started (left by a provider that was killed)."""
    found = subprocess.run(engine.command("ps", "-aq", "--filter", f"label={LABEL}={state_key}"),
                           capture_output=True, text=True, check=False)
    ids = found.stdout.split()
    if ids:
        subprocess.run(engine.command("rm", "-f", *ids), capture_output=True, check=False)


def remove_container(engine: Any, state_key: str, function: str) -> None:
    subprocess.run(engine.command("rm", "-f", "--ignore", container_name(state_key, function)),
                   capture_output=True, check=False)


class SocketForward:
    """A socket file that forwards each connection to a loopback TCP port: how a script function's
    container, which has no network, reaches gateway-fn (its Service, in the cluster)."""

    def __init__(self, path: Path, host: str, port: int) -> None:
        self.path = path
        self.target = (host, port)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o666)  # the container's non-root user connects to it
        self.listener.listen(256)
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"forward-{path.name}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(conn,), daemon=True).start()

    def _connect(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            src.close()


def image_context(engine: Any, image: str) -> str | None:
    """The build context an image was built from (its com.customscripts.context-sha256 label)."""
    done = subprocess.run(engine.command("image", "inspect", "--format",
                                         '{{index .Labels "com.customscripts.context-sha256"}}', image),
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None


class ContainerRuntime(Runtime):
    """Each function a container of its image: a script function without a network, serving on a socket
    file and reaching gateway-fn through another; a platform function on the host's loopback, as under
    the process runtime."""

    name = "container"

    def __init__(self, *, host: str, state_dir: Path, secrets: Mapping[str, str], start_timeout: float,
                 state_key: str) -> None:
        super().__init__(host=host, state_dir=state_dir, secrets=secrets, start_timeout=start_timeout)
        from customscripts.faas import images

        self.engine = images.require_engine()
        self.state_key = state_key

    def direct_address(self, spec: Mapping[str, Any]) -> bool:
        """A script function's container has no network: it is reached through /function/<name> only."""
        return is_platform(spec)

    def start(self, name: str, spec: dict[str, Any], folder: Path, *, port: int,
              gateway_port: int | None = None) -> FunctionProcess:
        from customscripts.faas.builder import BuildFailed, PodmanBuilder

        image = spec["image"]
        if image_context(self.engine, image) != context_sha256(folder):  # missing, or built from other code
            try:
                PodmanBuilder(self.engine).build(folder, image)
            except BuildFailed as exc:
                raise FunctionStartError(name, f"image {image} could not be built: {exc}") from exc
        secrets_dir = self.secrets_dir(name, spec)
        for path in (secrets_dir, *secrets_dir.iterdir()):  # the container's non-root user reads them
            os.chmod(path, 0o755 if path.is_dir() else 0o444)  # (run/<name>/ stays private on the host)
        env = {**(spec.get("envVars") or {}), "fprocess": spec.get("envProcess") or DEFAULT_FPROCESS,
               "CS_FUNCTION_NAME": name, "HOSTNAME": name, "PYTHONUNBUFFERED": "1",
               "CS_FN_METRICS_PORT": "-1"}  # no ops listener: nothing on the host could reach it
        socket_dir: Path | None = None
        forwards: list[Any] = []
        shared: tuple[Path, ...] = ()
        if is_platform(spec):
            env["CS_FN_LISTEN"] = f"127.0.0.1:{port}"
            if env.get("CS_FUNCTIONS_DIR"):  # registry-fn renders build contexts where the provider reads them
                shared = (Path(env["CS_FUNCTIONS_DIR"]),)
                shared[0].mkdir(parents=True, exist_ok=True)
                owner = image_user(self.engine, image)
                if owner is not None:
                    os.chown(shared[0], *owner)
        else:
            socket_dir = self.run_dir(name) / "sockets"
            shutil.rmtree(socket_dir, ignore_errors=True)
            socket_dir.mkdir(parents=True)
            os.chmod(socket_dir, 0o777)  # the function's user creates its socket here
            env["CS_FN_LISTEN"] = f"unix:{SOCKET_DIR}/{FUNCTION_SOCKET}"
            if env.get("CS_GATEWAY_URL") in ("", settings().data_gateway_url) and gateway_port is not None:
                sock = socket_dir / "gateway-fn.sock"
                forwards.append(SocketForward(sock, "127.0.0.1", gateway_port))
                env["CS_GATEWAY_URL"] = "http+unix://" + quote(f"{SOCKET_DIR}/{sock.name}", safe="")
        remove_container(self.engine, self.state_key, name)
        argv = run_argv(self.engine, name=name, image=image, spec=spec, env=env, secrets_dir=secrets_dir,
                        socket_dir=socket_dir, state_key=self.state_key, shared_dirs=shared)
        logpath = self.log_path(name)
        started = time.monotonic()
        with open(logpath, "ab") as logfile:
            log_start = logfile.tell()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        unix_path = str(socket_dir / FUNCTION_SOCKET) if socket_dir is not None else None
        port = 0 if unix_path else port
        try:
            self._await_listening(proc, name, unix_path, port, logpath, log_start)
        except BaseException:
            for forward in forwards:
                forward.close()
            remove_container(self.engine, self.state_key, name)
            raise
        cold_started(spec, started)
        logs.event(log, "function started", function=name, pid=proc.pid, image=image, runtime="container",
                   address=unix_path or port, cold_start_ms=round((time.monotonic() - started) * 1000, 1))
        return FunctionProcess(name=name, proc=proc, port=port, spec=spec, unix_path=unix_path, forwards=forwards,
                               context=context_sha256(folder))

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
        raise self.failed(proc, name, logpath, log_start)

    def stopped(self, name: str) -> None:
        remove_container(self.engine, self.state_key, name)

    def close(self) -> None:
        """Remove this state's containers, and any a killed predecessor left."""
        remove_containers(self.engine, self.state_key)
