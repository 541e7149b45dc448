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
import socket
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from customscripts import logs

log = logs.get("customscripts.faas.containers")

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
