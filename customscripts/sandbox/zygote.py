"""The warm zygote: preloads the runtime and allowlisted modules, compiles the script once, then forks
one child per execution (or batch) on the supervisor's request.

Runs inside bubblewrap (or as a plain process in `process` mode). Never runs user code itself.
Protocol on the control socket (SOCK_SEQPACKET, JSON):
  supervisor -> zygote  {"op":"spawn","tag":n,"cpu_s":x}
  zygote -> supervisor  {"op":"spawned","tag":n,"pid":p} + fds [child socket, pidfd]
                        {"op":"exited","pid":p,"status":s,"utime":..,"stime":..,"maxrss_kb":..}
                        {"op":"ready","preloaded":[...], "pid":p}
The init message (script source, limits, BPF) arrives length-prefixed on stdin.
Stdlib only until preload.
"""

from __future__ import annotations

import gc
import os
import selectors
import shutil
import signal
import socket
import sys

from . import imports, protocol, rlimits, runtime, seccomp

FALLBACK_BASELINE_VM = 256 * 1024 * 1024  # if neither /proc nor the supervisor could measure us


def _read_init() -> dict:
    import json

    raw = sys.stdin.buffer.read()
    sys.stdin.close()
    return json.loads(raw)


def _wipe_tmp(path: str) -> None:
    """Each execution starts with an empty /tmp: nothing leaks from one child to the next."""
    try:
        entries = os.listdir(path)
    except OSError:
        return
    for name in entries:
        full = os.path.join(path, name)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)
        except OSError:
            pass


class Zygote:
    def __init__(self, ctl: socket.socket, init: dict) -> None:
        self.ctl = ctl
        self.init = init
        self.bpf = bytes.fromhex(init["bpf"]) if init.get("bpf") else b""
        self.tmp = init.get("tmp_dir") or "/tmp"
        self.limits = init["limits"]
        self.children: set[int] = set()

    def prepare(self) -> list[str]:
        seccomp.prepare()
        seccomp.set_dumpable(False)
        allowed = frozenset(self.limits["allowed_modules"])
        preloaded = imports.preload(allowed)
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
            max_output_bytes=int(self.limits["max_output_bytes"]))
        self.baseline_vm = rlimits.current_vm_bytes()
        gc.collect()
        gc.freeze()  # children share the preloaded heap copy-on-write without gc touching it
        return preloaded

    def spawn(self, tag: int, cpu_s: float) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # child
            try:
                self._child(parent_end, child_end, cpu_s)
            finally:
                os._exit(0)
        child_end.close()
        self.children.add(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        fds = [parent_end.fileno()] + ([pidfd] if pidfd >= 0 else [])
        protocol.send_packet(self.ctl, {"op": "spawned", "tag": tag, "pid": pid}, fds)
        parent_end.close()
        if pidfd >= 0:
            os.close(pidfd)

    def _child(self, parent_end: socket.socket, child_end: socket.socket, cpu_s: float) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        self.ctl.close()
        parent_end.close()
        self.sel.close()
        keep = child_end.fileno()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if keep != 3:
            os.dup2(keep, 3)
            child_end.close()
            child_end = socket.socket(fileno=3)
        os.closerange(4, 65536)
        os.chdir(self.tmp)
        lim = self.limits
        baseline = self.baseline_vm or FALLBACK_BASELINE_VM
        rlimits.apply(cpu_seconds=cpu_s, memory_mb=int(lim["memory_mb"]), baseline_vm=baseline,
                      fsize_mb=int(lim["tmp_size_mb"]))
        seccomp.set_no_new_privs()
        if self.bpf:
            seccomp.install(self.bpf)
        self.runtime.serve(child_end)
        try:
            sys.stdout = sys.__stdout__
            sys.stderr = sys.__stderr__
        except Exception:
            pass

    def reap(self) -> None:
        while self.children:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            _wipe_tmp(self.tmp)
            protocol.send_packet(self.ctl, {
                "op": "exited", "pid": pid, "status": status, "utime": ru.ru_utime, "stime": ru.ru_stime,
                "maxrss_kb": ru.ru_maxrss})

    def serve(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        self.sel.register(rfd, selectors.EVENT_READ, "sig")
        while True:
            for key, _ in self.sel.select():
                if key.data == "sig":
                    try:
                        while os.read(rfd, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                    continue
                try:
                    msg, fds = protocol.recv_packet(self.ctl)
                except (protocol.PeerClosed, ConnectionError):
                    return
                for fd in fds:
                    os.close(fd)
                if msg.get("op") == "spawn":
                    self.spawn(int(msg.get("tag", 0)), float(msg.get("cpu_s", self.limits["cpu_seconds"])))
                elif msg.get("op") == "config":
                    if not self.baseline_vm and isinstance(msg.get("baseline_vm"), int):
                        self.baseline_vm = msg["baseline_vm"]
                elif msg.get("op") == "exit":
                    return


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ctl_fd = int(argv[0])
    ctl = socket.socket(fileno=ctl_fd)
    os.set_inheritable(ctl_fd, False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init = _read_init()
    z = Zygote(ctl, init)
    preloaded = z.prepare()
    protocol.send_packet(ctl, {"op": "ready", "preloaded": preloaded, "pid": os.getpid(),
                               "baseline_vm": z.baseline_vm,
                               "guards": bool(init.get("guards", True))})
    z.serve()


if __name__ == "__main__":
    main()
