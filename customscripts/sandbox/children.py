"""Handles on the sandbox's processes: the zygote (one per script, preloaded and compiled) and the
children it forks, one per execution or batch.

Why separate from the supervisor: these are the parts that talk to the kernel (pidfds, the per-process
CPU clock, /proc) and to the zygote's control socket; the supervisor decides what to do with them.
Everything a child or the zygote reports is hostile except the zygote's wait4 figures, which it
takes from the kernel after the child is gone.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time

from customscripts import logs

from . import bwrap, protocol
from .limits import SandboxLimits

log = logs.get("customscripts.sandbox")

# allowlisted heavy modules bound into the sandbox (read-only) and preloaded, with what they import
THIRD_PARTY = ["numpy", "pandas", "dateutil", "six"]
ZYGOTE_START_TIMEOUT_S = 20.0
EXIT_REPORT_TIMEOUT_S = 5.0
PF_EXITING = 0x4  # include/linux/sched.h: set at the start of do_exit, before the task releases anything


class IsolationUnavailable(RuntimeError):
    """A configured isolation layer is missing; the message names the layer. Never run weaker."""

    def __init__(self, layer: str, detail: str) -> None:
        super().__init__(f"isolation layer {layer!r} unavailable: {detail}")
        self.layer = layer


class Child:
    __slots__ = ("cpu0", "hostpid", "pid", "pidfd", "sock")

    def __init__(self, pid: int, sock: socket.socket, pidfd: int) -> None:
        self.pid = pid  # as the zygote sees it (its pid namespace under bwrap)
        self.sock = sock
        self.pidfd = pidfd
        self.hostpid = host_pid(pidfd) if pidfd >= 0 else None  # as this process sees it
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


def host_pid(pidfd: int) -> int | None:
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


class ExitReport:
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


class Zygote:
    """One zygote process plus the reader thread of its control socket."""

    def __init__(self, *, source: str, filename: str, limits: SandboxLimits, isolation: str, guards: bool,
                 bpf: tuple[bytes, bytes]) -> None:
        self.cpu_s = float(limits.cpu_seconds)
        self.ready: queue.Queue[Child] = queue.Queue()
        self.exits: dict[int, ExitReport] = {}
        self.waiters: dict[int, queue.Queue[Child]] = {}
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
                    child = Child(int(msg["pid"]), socket.socket(fileno=fds[0]), fds[1] if len(fds) > 1 else -1)
                    waiter = self.waiters.pop(int(msg.get("tag", 0)), None)
                    (waiter or self.ready).put(child)
                elif op == "exited":
                    with self.cond:
                        self.exits[int(msg["pid"])] = ExitReport(msg)
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

    def spawn_now(self, tag: int, cpu_s: float, timeout: float = 10.0) -> Child:
        q: queue.Queue[Child] = queue.Queue()
        self.waiters[tag] = q
        self.request_spawn(tag, cpu_s)
        return q.get(timeout=timeout)

    def wait_exit(self, pid: int, timeout: float = EXIT_REPORT_TIMEOUT_S) -> ExitReport | None:
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
