"""The trusted supervisor: owns one warm zygote per script, hands each execution (or batch) to a fresh
pre-forked child, answers the child's read calls from a DataSource, enforces the wall-clock timeout
by SIGKILL (via pidfd) and turns what comes back into validated ExecutionResults.

Why this shape: forking from a zygote that already imported numpy and compiled the script costs well
under a millisecond, and pre-forking keeps even that off the request path. The only channel out of a
child is its socketpair; everything it sends is size-capped JSON (never unpickled here).

The request path, and what was moved off it:
  * the pre-forked child is fully set up (rlimits, seccomp, module namespace, runtime paths primed)
    and blocked on its socket before the request arrives;
  * numeric read replies travel as raw float64 columns (protocol.binary_frame), cached per request;
  * once the child has answered every item it waits on its socket; the supervisor measures it from
    outside - CPU time from the kernel's per-process CPU clock, peak RSS from the host's
    /proc/<pid>/status (VmHWM) - SIGKILLs it and replies. It does not wait for the exit and the
    zygote's wait4 report (about 1 ms of mm teardown and reaping); wait4 is the authority wherever
    the child did not finish normally or could not be measured alive (timeouts, crashes, protocol
    violations), and the zygote reaps everything in the background.
  * a killed child is certainly gone before the next child gets its request: the supervisor checks
    its pidfd or the kernel's PF_EXITING flag. Each child has its own /tmp anyway (privatetmp.py).

What the child sends is hostile in every byte: frames are size-capped, parsed strictly (finite numbers
only, bounded nesting: protocol.loads_strict), and only `call` and `item` messages exist; usage the
child might claim is never read. Any exception of the supervisor's own while serving a child ends
that child (killed, and gone before the next execution starts). Reads count against the wall
timeout: the data source gets the time that is left (datasource.read_deadline).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from customscripts import logs
from customscripts.config import settings

from . import bwrap, protocol
from . import seccomp as seccomp_mod
from .datasource import (
    ColumnFrames,
    DataAccessError,
    DataDenied,
    DataSource,
    DataSourceUnavailable,
    DeadlineExceeded,
    DependencyUnavailable,
    read_deadline,
)
from .limits import SandboxLimits
from .prefetch import Prefetched, params_hash
from .results import ExecutionResult, InvalidOutput, OutputValidator

log = logs.get("customscripts.sandbox")

# allowlisted heavy modules bound into the sandbox (read-only) and preloaded, with what they import
THIRD_PARTY = ["numpy", "pandas", "dateutil", "six"]
ZYGOTE_START_TIMEOUT_S = 20.0
EXIT_REPORT_TIMEOUT_S = 5.0
MAX_MARKET_LIMIT = 5000
ISOLATION_MODES = ("bwrap", "process")
PF_EXITING = 0x4  # include/linux/sched.h: set at the start of do_exit, before the task releases anything
BINARY_FNS = frozenset({"market", "metric"})  # replies the child turns into numpy columns (Bars)


class IsolationUnavailable(RuntimeError):
    """A configured isolation layer is missing; the message names the layer. Never run weaker."""

    def __init__(self, layer: str, detail: str) -> None:
        super().__init__(f"isolation layer {layer!r} unavailable: {detail}")
        self.layer = layer


@dataclass
class ExecutionRequest:
    instrument_key: str
    timeframe: str
    params: dict
    timestamp: float
    data: DataSource | None = None
    prefetch: Prefetched | None = None  # reads the scheduler sent along; answered here when covered

    def wire(self) -> dict:
        return {"instrument_key": self.instrument_key, "timeframe": self.timeframe,
                "params": self.params or {}, "timestamp": float(self.timestamp)}


_BPF: tuple[bytes, bytes] | None = None
_BPF_LOCK = threading.Lock()


def compiled_seccomp() -> tuple[bytes, bytes]:
    """The two BPF stages (zygote, child), compiled once per process."""
    global _BPF
    with _BPF_LOCK:
        if _BPF is None:
            try:
                _BPF = seccomp_mod.compile_filters()
            except seccomp_mod.SeccompUnavailable as exc:
                raise IsolationUnavailable("seccomp", str(exc)) from exc
        return _BPF


class _Child:
    __slots__ = ("cpu0", "hostpid", "pid", "pidfd", "sock")

    def __init__(self, pid: int, sock: socket.socket, pidfd: int) -> None:
        self.pid = pid  # as the zygote sees it (its pid namespace under bwrap)
        self.sock = sock
        self.pidfd = pidfd
        self.hostpid = _host_pid(pidfd) if pidfd >= 0 else None  # as this process sees it
        self.cpu0: float | None = None

    def kill(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def cpu_s(self) -> float | None:
        """The child's CPU time (user+system) from the kernel's per-process CPU clock."""
        if self.hostpid is None:
            return None
        try:
            return time.clock_gettime(((~self.hostpid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, SCHED)
        except OSError:
            return None

    def peak_rss_kb(self) -> int | None:
        """The child's peak RSS (VmHWM) from the host's /proc, read from outside while it is alive; None
        once it has exited (a zombie has no memory map: then wait4's figure is used). The pidfd is
        checked after the read, so a reused pid is never measured."""
        if self.hostpid is None:
            return None
        try:
            with open(f"/proc/{self.hostpid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmHWM:"):
                        kb = int(line.split()[1])
                        return None if self.exited() else kb
        except (OSError, ValueError, IndexError):
            pass
        return None

    def exited(self) -> bool:
        """True once the kernel reports the child exited (its pidfd is readable)."""
        return self.exited_within(0.0)

    def exited_within(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the child's exit; True once the kernel reports it."""
        if self.pidfd < 0:
            return False
        poller = select.poll()  # not select(): pidfds can be numbered above FD_SETSIZE
        poller.register(self.pidfd, select.POLLIN)
        with contextlib.suppress(OSError):
            return bool(poller.poll(int(timeout_s * 1000)))
        return False

    def gone(self) -> bool:
        """After SIGKILL: the child will never run another instruction of its own - it has exited, or
        it is inside do_exit (PF_EXITING, set before it releases files or memory). Pid reuse is ruled
        out by checking the pidfd after reading /proc: a pid is only reused after the exit the pidfd
        reports."""
        if self.exited():
            return True
        if self.hostpid is None:
            return False
        try:
            with open(f"/proc/{self.hostpid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            state, flags = fields[0], int(fields[6])
        except (OSError, ValueError, IndexError):
            return self.exited()
        if self.exited():
            return True
        return state in (b"Z", b"X", b"x") or bool(flags & PF_EXITING)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


def _host_pid(pidfd: int) -> int | None:
    """The pid of a pidfd's process in this process's pid namespace (/proc/self/fdinfo, Linux >= 5.4)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


class _ExitInfo:
    __slots__ = ("maxrss_kb", "status", "stime", "utime")

    def __init__(self, msg: dict) -> None:
        self.status = int(msg.get("status", 0))
        self.utime = float(msg.get("utime", 0.0))
        self.stime = float(msg.get("stime", 0.0))
        self.maxrss_kb = int(msg.get("maxrss_kb", 0))

    @property
    def cpu_ms(self) -> float:
        return round((self.utime + self.stime) * 1000, 3)

    @property
    def memory_mb(self) -> float:
        return round(self.maxrss_kb / 1024, 2)


class _Zygote:
    """One zygote process plus the reader thread of its control socket."""

    def __init__(self, *, source: str, filename: str, limits: SandboxLimits, isolation: str, guards: bool,
                 bpf: tuple[bytes, bytes]) -> None:
        self.cpu_s = float(limits.cpu_seconds)
        self.ready: queue.Queue[_Child] = queue.Queue()
        self.exits: dict[int, _ExitInfo] = {}
        self.waiters: dict[int, queue.Queue[_Child]] = {}
        self.cond = threading.Condition()
        self.alive = False
        self.tmpdir: tempfile.TemporaryDirectory | None = None
        parent_ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctl = parent_ctl
        if isolation == "bwrap":
            py = bwrap.zygote_argv(child_ctl.fileno(), sandbox=True)
            argv = bwrap.build_argv(py, tmp_size_mb=limits.tmp_size_mb, third_party=THIRD_PARTY)
            env = {"PATH": "/usr/bin:/bin"}
            tmp_dir = "/tmp"
        else:
            argv = bwrap.zygote_argv(child_ctl.fileno(), sandbox=False)
            self.tmpdir = tempfile.TemporaryDirectory(prefix="cs-sbx-")
            tmp_dir = self.tmpdir.name
            env = {"PATH": "/nonexistent", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TMPDIR": tmp_dir, "HOME": tmp_dir}
        init = {"source": source, "filename": filename, "limits": limits.to_wire(), "guards": guards,
                "bpf_zygote": bpf[0].hex(), "bpf_child": bpf[1].hex(), "tmp_dir": tmp_dir,
                "own_user_namespace": isolation == "process"}
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, pass_fds=(child_ctl.fileno(),), env=env,
                                         close_fds=True, start_new_session=True)
        except OSError as exc:
            child_ctl.close()
            parent_ctl.close()
            raise IsolationUnavailable(isolation, f"cannot start zygote: {exc}") from exc
        child_ctl.close()
        self.isolation = isolation
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._drain_stderr, name="sbx-zygote-stderr", daemon=True).start()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(protocol.dumps(init))
            self.proc.stdin.close()
        except OSError:
            pass
        self.info: dict = {}

    def wait_ready(self) -> None:
        """Block until the zygote has preloaded and compiled (it boots while the caller does other
        work, e.g. compiling the output schema)."""
        isolation = self.isolation
        self.ctl.settimeout(ZYGOTE_START_TIMEOUT_S)
        try:
            msg, _ = protocol.recv_packet(self.ctl)
        except (OSError, protocol.ProtocolError) as exc:
            self.kill()
            detail = " | ".join(self.stderr_tail[-5:]) or str(exc)
            layer = "bubblewrap" if isolation == "bwrap" else "process"
            raise IsolationUnavailable(layer, f"zygote failed to start: {detail}") from exc
        self.ctl.settimeout(None)
        if msg.get("error"):
            self.kill()
            raise IsolationUnavailable("private-tmp", str(msg["error"])[:500])
        self.info = msg
        if not msg.get("baseline_vm"):
            # no /proc inside (root mode): measure the zygote's address space from the host side
            zpid = bwrap.descendant_leaf(self.proc.pid) if isolation == "bwrap" else self.proc.pid
            vm = bwrap.host_vm_bytes(zpid) if zpid else 0
            self.info["baseline_vm"] = vm
            if vm:
                protocol.send_packet(self.ctl, {"op": "config", "baseline_vm": vm})
        self.alive = True
        threading.Thread(target=self._read_loop, name="sbx-zygote-ctl", daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()[:2000]
            self.stderr_tail = ([*self.stderr_tail, line])[-50:]
            logs.event(log, "zygote stderr", line=line)

    def _read_loop(self) -> None:
        try:
            while True:
                msg, fds = protocol.recv_packet(self.ctl)
                op = msg.get("op")
                if op == "spawned" and fds:
                    child = _Child(int(msg["pid"]), socket.socket(fileno=fds[0]), fds[1] if len(fds) > 1 else -1)
                    waiter = self.waiters.pop(int(msg.get("tag", 0)), None)
                    (waiter or self.ready).put(child)
                elif op == "exited":
                    with self.cond:
                        self.exits[int(msg["pid"])] = _ExitInfo(msg)
                        if len(self.exits) > 10_000:  # never-collected entries (children closed unused)
                            for pid in list(self.exits)[:5000]:
                                self.exits.pop(pid, None)
                        self.cond.notify_all()
                else:
                    for fd in fds:
                        os.close(fd)
        except (OSError, protocol.ProtocolError):
            pass
        finally:
            with self.cond:
                self.alive = False
                self.cond.notify_all()

    def request_spawn(self, tag: int = 0, cpu_s: float | None = None) -> None:
        self.ctl.send(protocol.SPAWN.pack(b"S", tag, self.cpu_s if cpu_s is None else cpu_s))

    def spawn_now(self, tag: int, cpu_s: float, timeout: float = 10.0) -> _Child:
        q: queue.Queue[_Child] = queue.Queue()
        self.waiters[tag] = q
        self.request_spawn(tag, cpu_s)
        return q.get(timeout=timeout)

    def wait_exit(self, pid: int, timeout: float = EXIT_REPORT_TIMEOUT_S) -> _ExitInfo | None:
        """The child's wait4 status and rusage, reported by the zygote once it has reaped it."""
        try:
            protocol.send_packet(self.ctl, {"op": "watch", "pid": pid})
        except OSError:
            return None
        deadline = time.monotonic() + timeout
        with self.cond:
            while pid not in self.exits:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return None
                self.cond.wait(left)
            return self.exits.pop(pid)

    def kill(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            protocol.send_packet(self.ctl, {"op": "exit"})
        with contextlib.suppress(OSError):
            self.ctl.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.ctl.close()
        while True:
            try:
                self.ready.get_nowait().close()
            except queue.Empty:
                break
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        if self.tmpdir is not None:
            with contextlib.suppress(OSError):
                self.tmpdir.cleanup()


class Supervisor:
    """Runs one script in the sandbox, many times. Thread-safe (executions are serialised)."""

    def __init__(self, source: str, *, output_schema: dict | None = None, limits: SandboxLimits | None = None,
                 isolation: str | None = None, data: DataSource | None = None, filename: str = "script.py",
                 prefork: int | None = None, py_guards: bool | None = None, max_batch: int | None = None,
                 max_calls_per_item: int | None = None) -> None:
        cfg = settings()
        self.source = source
        self.filename = filename
        self.limits = limits or SandboxLimits.default()
        self.isolation = isolation or cfg.isolation_mode
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"unknown isolation mode {self.isolation!r}; use one of {ISOLATION_MODES}")
        self.data = data
        self.prefork = max(1, cfg.sandbox_prefork if prefork is None else prefork)
        self.guards = self.limits.py_guards and (cfg.sandbox_py_guards if py_guards is None else py_guards)
        self.max_batch = max(1, cfg.sandbox_max_batch if max_batch is None else max_batch)
        self.max_calls = max(1, cfg.sandbox_max_calls_per_item if max_calls_per_item is None
                             else max_calls_per_item)
        self._lock = threading.RLock()
        self._tag = 0
        self._owed = 0
        self._closed = False
        self._dying: list[_Child] = []  # killed after answering; must be gone before the next child runs
        self._check_layers()
        self._bpf = compiled_seccomp()
        self._zygote: _Zygote | None = None
        self._launch_zygote()  # it boots (bwrap, python, numpy, compile) while we compile the schema
        try:
            self.validator = OutputValidator(output_schema, self.limits.max_output_bytes)
            self._finish_zygote()
        except BaseException:
            self.close()
            raise
        self.max_frame = self.limits.max_output_bytes + 2 * self.limits.max_log_bytes + 16 * 1024

    # -- lifecycle -------------------------------------------------------------------------------
    def _check_layers(self) -> None:
        if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
            raise IsolationUnavailable("pidfd", "kernel/Python without pidfd support")
        if self.isolation == "bwrap":
            try:
                bwrap.find_bwrap()
            except bwrap.BwrapUnavailable as exc:
                raise IsolationUnavailable("bubblewrap", str(exc)) from exc

    def _start_zygote(self) -> None:
        self._launch_zygote()
        self._finish_zygote()

    def _launch_zygote(self) -> None:
        self._owed = 0
        self._release_dying()
        self._zygote = _Zygote(source=self.source, filename=self.filename, limits=self.limits,
                               isolation=self.isolation, guards=self.guards, bpf=self._bpf)

    def _finish_zygote(self) -> None:
        assert self._zygote is not None
        self._zygote.wait_ready()
        for _ in range(self.prefork):
            self._zygote.request_spawn()
        logs.event(log, "sandbox zygote ready", isolation=self.isolation, guards=self.guards,
                   preloaded=self._zygote.info.get("preloaded"))

    def _zyg(self) -> _Zygote:
        if self._closed:
            raise RuntimeError("supervisor is closed")
        if self._zygote is None or not self._zygote.alive or self._zygote.proc.poll() is not None:
            if self._zygote is not None:
                logs.event(log, "sandbox zygote lost; restarting")
                self._zygote.kill()
            self._start_zygote()
        assert self._zygote is not None
        return self._zygote

    def _release_dying(self) -> None:
        for child in self._dying:
            child.close()
        self._dying.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._zygote is not None:
                self._zygote.kill()
                self._zygote = None
            self._release_dying()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def zygote_alive(self) -> bool:
        """Whether the warm zygote runs now; read-only (a readiness probe must not restart it)."""
        zyg = self._zygote
        return zyg is not None and zyg.alive and zyg.proc.poll() is None

    @property
    def zygote_info(self) -> dict:
        return dict(self._zyg().info)

    # -- execution -------------------------------------------------------------------------------
    def execute(self, req: ExecutionRequest) -> ExecutionResult:
        return self.execute_batch([req])[0]

    def execute_batch(self, reqs: list[ExecutionRequest]) -> list[ExecutionResult]:
        """All items run in one child (one principal), sequentially, at most max_batch per child;
        each item has its own timeout. Read replies are cached for the duration of the call."""
        if not reqs:
            return []
        for r in reqs:
            if not math.isfinite(float(r.timestamp)):
                raise ValueError("an execution's timestamp must be a finite number")
        with self._lock:
            results: list[ExecutionResult] = []
            cache: dict[tuple, bytes] = {}
            try:
                while len(results) < len(reqs):
                    rest = reqs[len(results):len(results) + self.max_batch]
                    child = self._take_child(len(rest))
                    results.extend(self._drive(child, rest, cache))
            finally:
                self._replenish()
            return results

    def _replenish(self) -> None:
        zyg = self._zygote
        while self._owed and zyg is not None and zyg.alive:
            try:
                zyg.request_spawn()
            except OSError:
                return
            self._owed -= 1

    def _take_child(self, n_items: int) -> _Child:
        for attempt in range(2):
            zyg = self._zyg()
            try:
                if n_items == 1:
                    child = zyg.ready.get(timeout=10.0)
                    self._owed += 1  # replenished after this execution, off the request path
                else:
                    self._tag += 1
                    child = zyg.spawn_now(self._tag, float(self.limits.cpu_seconds) * n_items)
                return child
            except (queue.Empty, OSError):
                if attempt:
                    raise
                zyg.alive = False  # force restart
        raise RuntimeError("unreachable")

    def _await_dying(self) -> None:
        """Before a new child gets its request, every child killed earlier must be gone (it shares
        /tmp with the next one). Usually already true: the kill went out before the last reply."""
        zyg = self._zygote
        deadline = time.monotonic() + EXIT_REPORT_TIMEOUT_S
        for child in self._dying:
            while not child.gone():
                if time.monotonic() > deadline:
                    # never expected (a SIGKILLed task stuck in the kernel): a new zygote means a new
                    # /tmp and pid namespace, and the old one is killed with everything in it
                    logs.event(log, "sandbox child did not die after SIGKILL; restarting the zygote",
                               pid=child.pid)
                    if zyg is not None:
                        zyg.alive = False
                    break
                time.sleep(0.0001)  # it has been SIGKILLed: it only needs a CPU to get into do_exit
            child.close()
        self._dying.clear()

    def _drive(self, child: _Child, reqs: list[ExecutionRequest], cache: dict[tuple, bytes]
               ) -> list[ExecutionResult]:
        """Run reqs in child until done or the child dies; returns results for the items it finished
        (at least one: the item that timed out or crashed it). Whatever happens here, the child is
        dead (or certainly dying and awaited before the next one runs) when this returns or raises."""
        if self._dying:
            self._await_dying()
        zyg = self._zygote
        assert zyg is not None
        results: list[ExecutionResult] = []
        timeout_s = self.limits.timeout_ms / 1000.0
        sock = child.sock
        failure: ExecutionResult | None = None
        killed_by_us = False
        item_cpu: list[float | None] = []  # per answered item, from the kernel's clock of the child
        data_failures: list[BaseException] = []
        calls = 0
        cpu_end: float | None = None
        rss_kb: int | None = None
        child.cpu0 = cpu_mark = child.cpu_s()
        t_item = time.perf_counter()
        deadline = t_item + timeout_s  # the item's wall time, its reads included
        try:
            sock.settimeout(timeout_s)
            protocol.send_frame(sock, {"op": "run", "items": [r.wire() for r in reqs]}, allow_nan=True)
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                msg = protocol.recv_frame(sock, self.max_frame)  # strict: the child is hostile
                op = msg.get("op") if isinstance(msg, dict) else None
                if op == "call":
                    calls += 1
                    if calls > self.max_calls:
                        raise protocol.ProtocolError("too many data calls")
                    reply = self._answer_frame(msg, reqs[len(results)], data_failures, cache, deadline)
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)  # a child that stops reading cannot hold the supervisor
                    sock.sendall(reply)
                elif op == "item":
                    now = time.perf_counter()
                    cpu_now = child.cpu_s()
                    res = self._item_result(msg, reqs[len(results)], data_failures)
                    res.duration_ms = round((now - t_item) * 1000, 3)
                    item_cpu.append(None if cpu_now is None or cpu_mark is None else max(cpu_now - cpu_mark, 0.0))
                    cpu_mark = cpu_now
                    results.append(res)
                    data_failures = []
                    calls = 0
                    t_item = now
                    deadline = now + timeout_s
                    if len(results) == len(reqs):
                        break
                else:
                    raise protocol.ProtocolError(f"unexpected message {str(op)[:40]!r}")
        except TimeoutError:
            cpu_end, rss_kb = child.cpu_s(), child.peak_rss_kb()
            child.kill()
            killed_by_us = True
            failure = ExecutionResult(status="timeout", error={
                "type": "Timeout", "message": f"execution exceeded {self.limits.timeout_ms} ms and was killed",
                "traceback": ""})
        except protocol.PeerClosed:
            if not child.exited_within(0.1):  # it closed its end: normally it is exiting by itself
                child.kill()
                killed_by_us = True
            failure = ExecutionResult(status="error", error={
                "type": "SandboxError", "message": "sandboxed process exited without a result", "traceback": ""})
        except protocol.ProtocolError as exc:
            rss_kb = child.peak_rss_kb()
            child.kill()
            killed_by_us = True
            text = str(exc)
            status = "invalid_output" if "exceeds" in text else "error"
            failure = ExecutionResult(status=status, error={
                "type": "InvalidOutput" if status == "invalid_output" else "SandboxProtocolError",
                "message": text[:500], "traceback": ""})
        except OSError as exc:
            rss_kb = child.peak_rss_kb()
            child.kill()
            killed_by_us = True
            failure = ExecutionResult(status="error", error={
                "type": "SandboxError", "message": f"sandbox channel failed: {exc}", "traceback": ""})
        except Exception as exc:  # the trusted side failed while serving this child: the child ends here
            child.kill()
            killed_by_us = True
            logs.event(log, "supervisor failed serving a child; child killed", error=repr(exc)[:300])
            failure = ExecutionResult(status="error", error={
                "type": "SandboxError", "message": "the sandbox failed while serving this execution",
                "traceback": ""})
        except BaseException:  # interrupted (KeyboardInterrupt, SystemExit): no child survives it
            child.kill()
            self._dying.append(child)
            raise
        if failure is None:
            # every item answered and the child waits on its socket: measure it from outside while it
            # is alive, kill it and reply - the zygote reaps it in the background and the next child
            # only starts once this one is gone (_await_dying)
            cpu_end, rss_kb = child.cpu_s(), child.peak_rss_kb()
            child.kill()
            if cpu_end is not None and rss_kb is not None:
                with contextlib.suppress(OSError):
                    sock.close()
                self._dying.append(child)
                self._account(results, item_cpu, child.cpu0, cpu_end, rss_kb, None)
                return results
            # it did not wait to be measured (or no kernel clock): wait4 decides
        child.close()
        info = zyg.wait_exit(child.pid)
        if info is None:
            zyg.alive = False  # zygote did not report: restart it on the next call
        if failure is not None:
            failure.duration_ms = round((time.perf_counter() - t_item) * 1000, 3)
            if info is not None:
                self._classify_death(failure, info, killed_by_us)
            if data_failures and failure.status == "error":
                self._apply_data_failure(failure, data_failures)
            results.append(failure)
            logs.event(log, "sandbox execution failed", status=failure.status,
                       error=(failure.error or {}).get("message"))
        if info is not None:  # the kernel's figures for the child's whole life
            cpu_end, child.cpu0 = info.cpu_ms / 1000, None
            rss_kb = info.maxrss_kb
        self._account(results, item_cpu, child.cpu0, cpu_end, rss_kb or 0, failure)
        return results

    def _account(self, results: list[ExecutionResult], item_cpu: list[float | None], cpu0: float | None,
                 cpu_end: float | None, maxrss_kb: int, failure: ExecutionResult | None) -> None:
        """cpu_ms: the kernel's figure for the whole request (single item) or per answered item (batch),
        the rest to the item that ended the child; memory_mb: the child's peak RSS. All measured from
        outside the child."""
        total = None
        if cpu_end is not None:
            total = max(cpu_end - (cpu0 or 0.0), 0.0)
        finished = [r for r in results if r is not failure]
        if len(results) == 1:
            results[0].cpu_ms = round((total or 0.0) * 1000, 3)
        else:
            spent = 0.0
            for res, cpu in zip(finished, item_cpu, strict=False):
                res.cpu_ms = round((cpu or 0.0) * 1000, 3)
                spent += cpu or 0.0
            if failure is not None and total is not None:
                failure.cpu_ms = round(max(total - spent, 0.0) * 1000, 3)
        mem = round(maxrss_kb / 1024, 2) if maxrss_kb > 0 else 0.0
        for res in results:
            res.memory_mb = mem

    def _classify_death(self, res: ExecutionResult, info: _ExitInfo, killed_by_us: bool) -> None:
        st = info.status
        if os.WIFSIGNALED(st):
            sig = os.WTERMSIG(st)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and not killed_by_us):
                res.status = "timeout"
                res.error = {"type": "Timeout", "message":
                             f"CPU time limit of {self.limits.cpu_seconds} s exceeded", "traceback": ""}
            elif not killed_by_us:
                res.status = "error"
                res.error = {"type": "SandboxCrash", "message":
                             f"sandboxed process killed by signal {signal.Signals(sig).name} "
                             "(memory limit or forbidden operation)", "traceback": ""}
        elif os.WIFEXITED(st) and os.WEXITSTATUS(st) != 0 and res.status == "error":
            res.error = {"type": "SandboxError",
                         "message": f"sandboxed process exited with status {os.WEXITSTATUS(st)}", "traceback": ""}

    # -- data calls ------------------------------------------------------------------------------
    def _answer_frame(self, msg: dict, req: ExecutionRequest, failures: list[BaseException],
                      cache: dict[tuple, bytes], deadline: float) -> bytes:
        """The encoded reply to one read call; successful replies are cached for the request (key:
        data source, call, arguments after the as-of clamp). `deadline` (perf_counter) is the item's
        wall-time end: the data source gets what is left of it (TimeoutError once it is spent)."""
        fn = msg.get("fn")
        args = msg.get("args")
        source = req.data or self.data
        key: tuple | None = None
        if isinstance(args, dict) and isinstance(fn, str):
            try:
                key = (id(source), fn, float(req.timestamp), _freeze(args))
            except TypeError:
                key = None
            if key is not None and key in cache:
                return cache[key]
        if req.prefetch is not None and isinstance(args, dict):
            data = self._prefetched(fn, args, req, req.prefetch)
            if data is not None:
                if key is not None:
                    cache[key] = data
                return data
        token = read_deadline.set(time.monotonic() + (deadline - time.perf_counter()))
        try:
            reply = self._answer(msg, req, failures)
        finally:
            read_deadline.reset(token)
        if isinstance(reply, bytes):  # a columns frame from the source, ready for the child
            data = reply
        elif "ok" not in reply:
            return protocol.frame(reply, allow_nan=True)
        else:
            data = (_binary_reply(reply["ok"]) if fn in BINARY_FNS else None) or protocol.frame(reply, allow_nan=True)
        if key is not None:
            cache[key] = data
        return data

    @staticmethod
    def _prefetched(fn: Any, args: dict, req: ExecutionRequest, pre: Prefetched) -> bytes | None:
        """The reply from the request's prefetch when it certainly equals the data source's answer
        (same argument checks and as-of clamp as `_answer`); None sends the read to the data source."""
        try:
            if fn == "market":
                key, tf = _s(args.get("instrument_key"), 64), _s(args.get("timeframe"), 16)
                if (key, tf) != (req.instrument_key, req.timeframe):
                    return None  # only the item's own series: what its evaluation was scheduled for
                limit, start, end = _limit(args.get("limit")), _num(args.get("start")), _num(args.get("end"))
                end = req.timestamp if end is None else min(end, req.timestamp)  # as-of: never later
                return pre.market_frame(key, tf, limit=limit, start=start, end=end, as_of=float(req.timestamp))
            if fn == "script_output" and args.get("history") is None:
                sid, key = _s(args.get("script_id"), 128), _s(args.get("instrument_key"), 64)
                tf = _s(args.get("timeframe"), 16)
                params = args.get("params")
                if params is not None and not isinstance(params, dict):
                    return None
                hit = pre.script_output(sid, key, tf, params_hash(params), float(req.timestamp))
                return None if hit is None else protocol.frame({"ok": hit}, allow_nan=True)
        except (ValueError, TypeError, OverflowError):
            return None
        return None

    def _answer(self, msg: dict, req: ExecutionRequest, failures: list[BaseException]) -> dict | bytes:
        """The reply to one read call: {"ok": ...} or {"err": ...}, or a complete binary frame when
        the source answers market and metric reads as columns (`ColumnFrames`, e.g. GatewayClient)."""
        source = req.data or self.data
        fn = msg.get("fn")
        args = msg.get("args")
        if source is None:
            return {"err": {"kind": "data_error", "message": "no data source configured"}}
        if not isinstance(args, dict):
            return {"err": {"kind": "data_error", "message": "invalid arguments"}}
        try:
            if fn == "market":
                key, tf = _s(args.get("instrument_key"), 64), _s(args.get("timeframe"), 16)
                limit, start, end = _limit(args.get("limit")), _num(args.get("start")), _num(args.get("end"))
                end = req.timestamp if end is None else min(end, req.timestamp)  # as-of: never later
                if _frames(type(source)):
                    return _columns_frame(source.market_columns(key, tf, limit=limit, start=start, end=end))
                return {"ok": source.get_market_data(key, tf, limit=limit, start=start, end=end)}
            if fn == "metric":
                key, name = _s(args.get("instrument_key"), 64), _s(args.get("name"), 64)
                limit, start, end = _limit(args.get("limit")), _num(args.get("start")), _num(args.get("end"))
                end = req.timestamp if end is None else min(end, req.timestamp)
                if _frames(type(source)):
                    return _columns_frame(source.metric_columns(key, name, limit=limit, start=start, end=end))
                return {"ok": source.get_metric(key, name, limit=limit, start=start, end=end)}
            if fn == "script_output":
                sid, key = _s(args.get("script_id"), 128), _s(args.get("instrument_key"), 64)
                tf = _s(args.get("timeframe"), 16)
                params = args.get("params")
                if params is not None and not isinstance(params, dict):
                    raise ValueError("params must be an object")
                history = args.get("history")
                if history is not None:
                    history = _limit(history)
                return {"ok": source.get_script_output(sid, key, tf, params=params, history=history)}
            raise ValueError(f"unknown read call {fn!r}")
        except DeadlineExceeded:
            raise TimeoutError from None  # the read would outlast the execution's wall timeout
        except (ValueError, OverflowError) as exc:
            return {"err": {"kind": "data_error", "message": f"invalid read call: {exc}"}}
        except DependencyUnavailable as exc:
            failures.append(exc)
            return {"err": {"kind": "dependency_unavailable", "message": str(exc)}}
        except DataDenied as exc:
            failures.append(exc)
            return {"err": {"kind": "denied", "message": str(exc) or "read denied"}}
        except DataAccessError as exc:
            failures.append(exc)
            return {"err": {"kind": "data_error", "message": str(exc)}}
        except Exception as exc:
            logs.event(log, "data source failed", error=repr(exc))
            failures.append(DataAccessError(f"data source failed: {type(exc).__name__}"))
            return {"err": {"kind": "data_error", "message": "data source failed"}}

    def _apply_data_failure(self, res: ExecutionResult, failures: list[BaseException]) -> None:
        """The supervisor, not the child, decides: the data failure it saw explains the error."""
        for exc in failures:
            if isinstance(exc, DataDenied):
                res.status = "denied"
                res.error = {"type": "DataDenied", "message": str(exc) or "read denied",
                             "traceback": (res.error or {}).get("traceback", "")}
                return
        for exc in failures:
            if isinstance(exc, DependencyUnavailable):
                res.status = "dependency_failed"
                res.error = {"type": "DependencyUnavailable", "message": str(exc), "dependency": exc.script_id,
                             "traceback": (res.error or {}).get("traceback", "")}
                return
        exc = failures[-1]
        res.error = {"type": "DataAccessError", "message": str(exc),
                     "traceback": (res.error or {}).get("traceback", "")}
        res.retryable = isinstance(exc, DataSourceUnavailable)  # by type, from what this side saw

    def _item_result(self, msg: dict, req: ExecutionRequest, failures: list[BaseException]) -> ExecutionResult:
        stdout = _bounded(msg.get("stdout"), self.limits.max_log_bytes)
        stderr = _bounded(msg.get("stderr"), self.limits.max_log_bytes)
        kind = msg.get("kind")
        if kind == "ok":
            try:
                output = self.validator.validate(msg.get("value"), float(req.timestamp))
            except InvalidOutput as exc:
                return ExecutionResult(status="invalid_output", stdout=stdout, stderr=stderr, error={
                    "type": "InvalidOutput", "message": str(exc), "traceback": ""})
            return ExecutionResult(status="ok", output=output, stdout=stdout, stderr=stderr)
        error = msg.get("error") if isinstance(msg.get("error"), dict) else {}
        error = {"type": _bounded(error.get("type"), 100) or "Error",
                 "message": _bounded(error.get("message"), 2000),
                 "traceback": _bounded(error.get("traceback"), 8000)}
        status = "invalid_output" if kind == "invalid_output" else "error"
        res = ExecutionResult(status=status, error=error, stdout=stdout, stderr=stderr)
        if failures and status == "error":
            self._apply_data_failure(res, failures)
        return res


def _freeze(value: Any, depth: int = 0) -> Any:
    """A hashable form of JSON call arguments (TypeError if too deep)."""
    if depth > 8:
        raise TypeError("arguments nested too deeply")
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, list):
        return ("[", *(_freeze(v, depth + 1) for v in value))
    return (type(value).__name__, value)


def _binary_reply(payload: Any) -> bytes | None:
    """{"columns": {name: numbers}, ...} -> a binary frame the child maps with numpy.frombuffer; None
    when the payload is not purely numeric columns (then it goes as JSON)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("columns"), dict):
        return None
    head = {k: v for k, v in payload.items() if k != "columns"}
    body = protocol.columns_payload(head, payload["columns"])
    return None if body is None else _child_frame(body)


@functools.cache
def _frames(source_type: type) -> bool:
    """Whether a data source type answers with columns payloads (Protocol isinstance, once per type)."""
    return issubclass(source_type, ColumnFrames)


def _columns_frame(columns_body: bytes) -> bytes:
    frame = _child_frame(columns_body)
    if frame is None:
        raise DataAccessError("the data source sent a malformed columns reply")
    return frame


def _child_frame(columns_body: bytes | bytearray) -> bytes | None:
    """A columns payload (protocol.columns_payload: the data source's head + "f64" spec + columns) as
    the child's reply frame {"ok": head, "f64": spec} + the same columns; None if it is malformed."""
    try:
        split = protocol.split_binary(bytearray(columns_body) if isinstance(columns_body, bytes) else columns_body)
    except (ValueError, struct.error):
        return None
    if split is None or not isinstance(split[0], dict):
        return None
    head, blob = split
    spec = head.pop("f64", None)
    try:
        if not isinstance(spec, list) or sum(int(n) for _, n in spec) * 8 != len(blob):
            return None
    except (TypeError, ValueError):
        return None
    return protocol.binary_frame({"ok": head, "f64": spec}, bytes(blob))


def _bounded(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[:limit] + "...[truncated]"


def _s(value: Any, maxlen: int) -> str:
    if not isinstance(value, str) or not value or len(value) > maxlen:
        raise ValueError("expected a non-empty string")
    return value


def _num(value: Any) -> float | None:
    """A finite float or None: NaN or an infinity would defeat every comparison and clamp after it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    number = float(value)  # OverflowError for an int beyond float: an invalid read call too
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _limit(value: Any) -> int:
    if value is None:
        return 200
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("limit must be a positive integer")
    return min(value, MAX_MARKET_LIMIT)


def python_executable() -> str:
    return sys.executable
