"""Fixtures for the sandbox attack suite: real bubblewrap, no mocks."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from customscripts.sandbox import ExecutionRequest, SampleDataSource, SandboxLimits, Supervisor

CANARY = "cs-canary-7d1e0f0b5a"  # put in the host environment: must never reach a script
os.environ.setdefault("CS_TEST_CANARY", CANARY)

GOOG_TS = 1362096000.0  # last GOOG bar in the sample data


@dataclass
class Listener:
    """Loopback TCP + UDP + unix listeners in the test process; they record any contact."""

    tcp_port: int = 0
    udp_port: int = 0
    unix_path: str = ""
    abstract_name: str = ""
    hits: list[str] = field(default_factory=list)

    def start(self, tmpdir: str) -> None:
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind(("127.0.0.1", 0))
        self._tcp.listen(16)
        self.tcp_port = self._tcp.getsockname()[1]
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(("127.0.0.1", 0))
        self.udp_port = self._udp.getsockname()[1]
        self.unix_path = os.path.join(tmpdir, "listener.sock")
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._unix.bind(self.unix_path)
        self._unix.listen(4)
        self.abstract_name = f"cs-sbx-test-{os.getpid()}"
        self._abs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._abs.bind("\0" + self.abstract_name)
        self._abs.listen(4)
        for name, sock in (("tcp", self._tcp), ("unix", self._unix), ("abstract", self._abs)):
            threading.Thread(target=self._accept, args=(name, sock), daemon=True).start()
        threading.Thread(target=self._recv_udp, daemon=True).start()

    def _accept(self, name: str, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            self.hits.append(name)
            conn.close()

    def _recv_udp(self) -> None:
        while True:
            try:
                self._udp.recvfrom(4096)
            except OSError:
                return
            self.hits.append("udp")

    def stop(self) -> None:
        for s in (self._tcp, self._udp, self._unix, self._abs):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture(scope="session")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    lst = Listener()
    lst.start(str(tmp_path_factory.mktemp("listener")))
    yield lst
    lst.stop()


@pytest.fixture(scope="session")
def sample_data() -> SampleDataSource:
    return SampleDataSource()


def make_supervisor(source: str, *, guards: bool, data: SampleDataSource | None = None,
                    **limit_overrides: object) -> Supervisor:
    extra = frozenset(limit_overrides.pop("extra_modules", ()))  # type: ignore[arg-type]
    base = SandboxLimits.default()
    limits = SandboxLimits(
        timeout_ms=int(limit_overrides.pop("timeout_ms", 400)),  # type: ignore[arg-type]
        memory_mb=int(limit_overrides.pop("memory_mb", 128)),  # type: ignore[arg-type]
        cpu_seconds=float(limit_overrides.pop("cpu_seconds", 1)),  # type: ignore[arg-type]
        allowed_modules=base.allowed_modules | extra,
        max_output_bytes=base.max_output_bytes, max_log_bytes=base.max_log_bytes,
        tmp_size_mb=int(limit_overrides.pop("tmp_size_mb", 8)),  # type: ignore[arg-type]
        py_guards=guards)
    return Supervisor(source, limits=limits, isolation="bwrap", data=data or SampleDataSource(), prefork=1)


def request(**params: object) -> ExecutionRequest:
    return ExecutionRequest("GOOG", "1d", dict(params), GOOG_TS)
