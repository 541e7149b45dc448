"""The warm zygote: preloads the runtime and allowlisted modules, compiles the script once, then forks
one child per execution (or batch) on the supervisor's request.

Runs inside bubblewrap (or as a plain process in `process` mode, in a user namespace of its own).
Never runs user code itself: it only exercises the runtime's own request path with synthetic data
(Runtime.prime) before it freezes its heap for the children. Each child takes a private /tmp of its
own (privatetmp.py) and drops every capability before user code. Reaping happens here, off the
request path: the supervisor does not wait for a finished child's exit (it kills it).
Protocol on the control socket (SOCK_SEQPACKET, JSON):
  supervisor -> zygote  b"S" tag cpu_s   (protocol.SPAWN)
                        {"op":"watch","pid":p}   (send me p's exit report)
  zygote -> supervisor  b"P" tag pid (protocol.SPAWNED) + fds [child socket, pidfd]
                        {"op":"exited","pid":p,"status":s,"utime":..,"stime":..,"maxrss_kb":..}
                        (only for watched children: a child that answered every item is killed by
                        the supervisor and reaped here silently)
                        {"op":"ready","preloaded":[...], "pid":p} or {"op":"ready","error":why}
The init message (script source, limits, BPF) arrives length-prefixed on stdin.
Stdlib only until preload.
"""

from __future__ import annotations

import _socket
import gc
import json
import os
import select
import signal
import socket
import struct
import sys

from . import imports, privatetmp, protocol, rlimits, runtime, seccomp

FALLBACK_BASELINE_VM = 256 * 1024 * 1024  # if neither /proc nor the supervisor could measure us
MAX_FINISHED = 256  # unrequested exit reports kept for a late "watch"
IDLE_REAP_MS = 1000
_FDS1 = struct.Struct("i")
_FDS2 = struct.Struct("2i")


def _read_init() -> dict:
    import json

    raw = sys.stdin.buffer.read()
    sys.stdin.close()
    return json.loads(raw)


class Zygote:
    def __init__(self, ctl: socket.socket, init: dict) -> None:
        self.ctl = ctl
        self.init = init
        self.bpf_zygote = bytes.fromhex(init.get("bpf_zygote") or "")
        self.bpf_child = bytes.fromhex(init.get("bpf_child") or "")
        self.filter: seccomp.Prepared | None = None
        self.devnull = -1
        self.tmp = init.get("tmp_dir") or "/tmp"
        self.limits = init["limits"]
        self.private_tmp = privatetmp.PrivateTmp(self.tmp, int(self.limits["tmp_size_mb"]),
                                                 int(self.limits["tmp_inodes"]))
        self.children: set[int] = set()
        self.finished: dict[int, tuple] = {}  # usage of reaped children nobody asked for (yet)
        self.watched: dict[int, int] = {}  # pid -> pidfd of children the supervisor waits for

    def prepare(self) -> list[str]:
        seccomp.prepare()
        seccomp.set_dumpable(False)
        if self.bpf_child:
            self.filter = seccomp.Prepared(self.bpf_child)
        allowed = frozenset(self.limits["allowed_modules"])
        preloaded = imports.preload(allowed, self.init["source"])
        guards = bool(self.init.get("guards", True))
        code = None
        compile_error = None
        try:
            code = imports.compile_script(self.init["source"], self.init["filename"], guards)
        except (SyntaxError, imports.SandboxViolation, ValueError) as exc:
            compile_error = runtime.format_error(exc, self.init["filename"])
            if isinstance(exc, SyntaxError) and exc.lineno:
                compile_error["traceback"] = (
                    f'  File "{self.init["filename"]}", line {exc.lineno}\n'
                    f"    {(exc.text or '').strip()}\nSyntaxError: {exc.msg}")
        self.runtime = runtime.Runtime(
            code=code, compile_error=compile_error, filename=self.init["filename"],
            script_builtins=imports.make_builtins(allowed) if guards else None,
            max_log_bytes=int(self.limits["max_log_bytes"]),
            max_output_bytes=int(self.limits["max_output_bytes"]),
            prime_imports=tuple(m for m in imports.imported_roots(self.init["source"]) if m in preloaded))
        self.runtime.prime()  # fill lazy caches once, so children inherit them instead of building them
        self.baseline_vm = rlimits.current_vm_bytes()
        self.devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(self.devnull, 0)  # stdin was the init pipe
        gc.collect()
        gc.freeze()  # children share the preloaded heap copy-on-write without gc touching it
        if self.bpf_zygote:  # stage 1 of the filter: from here on the zygote is confined too
            seccomp.Prepared(self.bpf_zygote).install()
        return preloaded

    def spawn(self, tag: int, cpu_s: float) -> None:
        """Fork one child and hand its channel and pidfd to the supervisor. Kept to plain fds and
        fixed structs: after a fork every page the zygote writes is copied."""
        a, b = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent_fd, child_fd = a.detach(), b.detach()
        pid = os.fork()
        if pid == 0:  # child
            try:
                self._child(child_fd, cpu_s)
            finally:
                os._exit(0)
        os.close(child_fd)
        self.children.add(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        fds = _FDS2.pack(parent_fd, pidfd) if pidfd >= 0 else _FDS1.pack(parent_fd)
        self.ctl.sendmsg([protocol.SPAWNED.pack(b"P", tag, pid)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        os.close(parent_fd)
        if pidfd >= 0:
            os.close(pidfd)

    def _child(self, child_fd: int, cpu_s: float) -> None:
        """Between fork and the request. Only OS-level fd work (the zygote's socket objects are never
        finalised here: the child leaves with os._exit), so few heap pages are written."""
        for fd in (0, 1, 2):
            os.dup2(self.devnull, fd)
        if child_fd != 3:
            os.dup2(child_fd, 3)
        os.closerange(4, 65536)  # the zygote's control socket, watched pidfds, /dev/null
        try:
            self.private_tmp.enter()  # own mount namespace + fresh capped tmpfs; no capabilities after
        except OSError:
            os._exit(71)  # never run user code without it (the start-up probe makes this unexpected)
        child_end = socket.socket(fileno=3)
        lim = self.limits
        baseline = self.baseline_vm or FALLBACK_BASELINE_VM
        rlimits.apply(cpu_seconds=cpu_s, memory_mb=int(lim["memory_mb"]), baseline_vm=baseline,
                      fsize_mb=int(lim["tmp_size_mb"]))
        if self.filter is not None:
            self.filter.install()  # no_new_privs + stage 2 of the filter
        else:
            seccomp.set_no_new_privs()
        self.runtime.serve(child_end)

    def reap(self) -> None:
        """Collect every dead child without blocking; report the ones the supervisor watches."""
        while self.children:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            usage = (status, ru.ru_utime, ru.ru_stime, ru.ru_maxrss)
            if pid in self.watched:
                self._report(pid, usage)
            else:
                self.finished[pid] = usage
                if len(self.finished) > MAX_FINISHED:
                    del self.finished[next(iter(self.finished))]

    def watch(self, pid: int) -> None:
        """The supervisor waits for this child's exit report (it did not finish normally)."""
        usage = self.finished.pop(pid, None)
        if usage is None and pid not in self.children:
            usage = (0, 0.0, 0.0, 0)  # unknown (reported long ago)
        if usage is not None:
            self._report(pid, usage)
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            self.reap()
            if pid in self.finished:
                self._report(pid, self.finished.pop(pid))
            return
        self.watched[pid] = pidfd
        self.poll.register(pidfd, select.POLLIN)

    def _report(self, pid: int, usage: tuple) -> None:
        pidfd = self.watched.pop(pid, None)
        if pidfd is not None:
            self.poll.unregister(pidfd)
            os.close(pidfd)
        status, utime, stime, maxrss = usage
        protocol.send_packet(self.ctl, {"op": "exited", "pid": pid, "status": status, "utime": utime,
                                        "stime": stime, "maxrss_kb": maxrss})

    def serve(self) -> None:
        """No SIGCHLD handler: dead children are reaped when the next spawn request comes (one wakeup
        per execution instead of two), when a watched child's pidfd turns readable, or on idle ticks."""
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        ctl_fd = self.ctl.fileno()
        self.poll = select.poll()
        self.poll.register(ctl_fd, select.POLLIN)
        spawn = protocol.SPAWN
        while True:
            events = self.poll.poll(IDLE_REAP_MS if self.children else None)
            if not events:
                self.reap()
            for fd, _ in events:
                if fd != ctl_fd:  # a watched child exited
                    self.reap()
                    continue
                try:
                    data = self.ctl.recv(protocol.MAX_CONTROL_PACKET)
                except ConnectionError:
                    return
                if not data:
                    return
                if len(data) == spawn.size and data[:1] == b"S":
                    _, tag, cpu_s = spawn.unpack(data)
                    self.reap()
                    self.spawn(tag, cpu_s)
                    continue
                try:
                    msg = json.loads(data)
                except ValueError:
                    continue
                op = msg.get("op") if isinstance(msg, dict) else None
                if op == "watch" and isinstance(msg.get("pid"), int):
                    self.watch(msg["pid"])
                elif op == "config":
                    if not self.baseline_vm and isinstance(msg.get("baseline_vm"), int):
                        self.baseline_vm = msg["baseline_vm"]
                elif op == "exit":
                    return


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ctl_fd = int(argv[0])
    ctl = socket.socket(fileno=ctl_fd)
    os.set_inheritable(ctl_fd, False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init = _read_init()
    if init.get("own_user_namespace"):
        try:
            privatetmp.enter_own_user_namespace()
        except OSError as exc:
            protocol.send_packet(ctl, {"op": "ready", "error": f"private /tmp: {exc}"})
            return
    z = Zygote(ctl, init)
    preloaded = z.prepare()
    broken = privatetmp.probe(z.private_tmp)
    if broken is not None:
        protocol.send_packet(ctl, {"op": "ready", "error": f"private /tmp: {broken}"})
        return
    protocol.send_packet(ctl, {"op": "ready", "preloaded": preloaded, "pid": os.getpid(),
                               "baseline_vm": z.baseline_vm,
                               "guards": bool(init.get("guards", True))})
    z.serve()


if __name__ == "__main__":
    main()
