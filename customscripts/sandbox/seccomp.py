"""Seccomp layer: a denylist filter compiled once (trusted side) and installed in every child.

Why compile outside: libseccomp/pyseccomp locate the library via ctypes.util.find_library, which
shells out to ldconfig - impossible (and undesirable) inside the sandbox. The supervisor compiles
the rules to raw BPF once; the zygote hands the bytes to each child, which installs them with one
prctl(PR_SET_SECCOMP) call via libc (tens of microseconds, off the request path).

Two stages: the zygote installs everything except what it needs itself (seccomp.ZYGOTE_NEEDS) once,
after preloading; each child installs a small second filter with the rest before any user code.
Stacked filters all apply (the strictest answer wins), so the child's policy is the full list, the
zygote is confined too, and the per-child cost is a ~20-instruction filter instead of ~115.

Policy choice on threads: the child may not create *any* task - clone, clone3, fork and vfork all
fail (EPERM; clone3 ENOSYS so libc does not retry). That blocks threads too, which makes a thread
bomb impossible and keeps CPU time <= wall time (so the wall-clock kill bounds CPU exactly). Numeric
code runs single-threaded (OPENBLAS_NUM_THREADS=1 is set in the zygote environment).
RLIMIT_NPROC=0 is the second wall behind this filter.

Sockets: `socket` and `socketpair` are denied for every address family; the child's one already-open
socketpair end to the supervisor keeps working through read/write/sendto/recvfrom.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable

# syscalls denied with EPERM (a Python exception in the script, not a crash)
DENIED_SYSCALLS: tuple[str, ...] = (
    # network: no socket creation of any family, no fd passing
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendmsg", "recvmsg",
    "sendmmsg", "recvmmsg",
    # new programs and processes (threads included, see module docstring)
    "execve", "execveat", "fork", "vfork", "clone",
    # looking into / signalling other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    # namespaces and mounts
    "mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel attack surface
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog",
    "lookup_dcookie", "name_to_handle_at", "open_by_handle_at", "iopl", "ioperm", "personality",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "mknod", "mknodat", "memfd_create",
    "memfd_secret", "vhangup", "uselib", "nfsservctl", "fanotify_init", "landlock_create_ruleset",
    # credentials and limits (limits are set before the filter; no raising them afterwards)
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid",
    "setgroups", "capset", "setrlimit", "prlimit64", "setpriority", "sched_setscheduler",
    "sched_setattr", "sched_setaffinity", "migrate_pages", "move_pages", "mbind", "set_mempolicy",
)
ENOSYS_SYSCALLS: tuple[str, ...] = ("clone3",)  # ENOSYS so glibc's pthread_create/fork fall back to clone
# What the zygote itself still needs (new channels, fd passing, forking, pidfds, lowering a child's
# limits). The filter is installed in two stages: the zygote runs under everything else, and each
# child adds a small filter that denies these too, so the child's policy is exactly the full list
# while the per-child install (a BPF load + JIT) stays small.
ZYGOTE_NEEDS: frozenset[str] = frozenset({"socketpair", "sendmsg", "recvmsg", "fork", "vfork", "clone",
                                          "clone3", "pidfd_open", "setrlimit", "prlimit64",
                                          # each child's private /tmp (privatetmp.py), before stage 2
                                          "unshare", "mount", "capset"})

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class SeccompUnavailable(RuntimeError):
    """libseccomp/pyseccomp missing or the kernel refuses filters."""


def compile_filter() -> bytes:
    """The whole policy as one filter (raw BPF, struct sock_filter[]). Trusted side only."""
    return _compile(lambda name: True, ioctl=True)


def compile_filters() -> tuple[bytes, bytes]:
    """(zygote stage, child stage): together exactly compile_filter()'s policy. Trusted side only."""
    return (_compile(lambda name: name not in ZYGOTE_NEEDS, ioctl=True),
            _compile(lambda name: name in ZYGOTE_NEEDS, ioctl=False))


def _compile(select: Callable[[str], bool], *, ioctl: bool) -> bytes:
    import os
    import tempfile

    try:
        import pyseccomp
    except Exception as exc:  # ImportError or OSError from a missing libseccomp
        raise SeccompUnavailable(f"pyseccomp/libseccomp not available: {exc}") from exc
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        if not select(name):
            continue
        try:
            flt.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        except (OSError, ValueError, RuntimeError):
            continue  # syscall unknown on this arch/libseccomp version
    for name in ENOSYS_SYSCALLS:
        if not select(name):
            continue
        try:
            flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
        except (OSError, ValueError, RuntimeError):
            continue
    if ioctl:  # ioctl(fd, TIOCSTI): no injecting keystrokes into a terminal
        flt.add_rule(pyseccomp.ERRNO(errno.EPERM), "ioctl", pyseccomp.Arg(1, pyseccomp.EQ, 0x5412))
    with tempfile.TemporaryFile() as fh:
        flt.export_bpf(fh)
        fh.flush()
        os.lseek(fh.fileno(), 0, os.SEEK_SET)
        data = fh.read()
    if not data or len(data) % 8:
        raise SeccompUnavailable("libseccomp produced no BPF program")
    return data


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc.prctl.restype = ctypes.c_int
    return _libc


def prepare() -> None:
    """Load libc in the zygote so children only make the syscall."""
    _get_libc()


def set_no_new_privs() -> None:
    if _get_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def set_dumpable(flag: bool) -> None:
    """PR_SET_DUMPABLE=0: siblings with the same uid cannot open our /proc/<pid>/mem or fds."""
    _get_libc().prctl(4, 1 if flag else 0, 0, 0, 0)


def install(bpf: bytes) -> None:
    """Install the precompiled filter in this process (needs NO_NEW_PRIVS first)."""
    Prepared(bpf).install()


class Prepared:
    """The filter's sock_fprog built once in the zygote, so that each child makes only the two prctl
    calls (no ctypes object construction between fork and the filter)."""

    def __init__(self, bpf: bytes) -> None:
        self.libc = _get_libc()
        self.buf = ctypes.create_string_buffer(bpf, len(bpf))
        self.prog = _SockFprog(len(bpf) // 8, ctypes.cast(self.buf, ctypes.c_void_p))
        self.addr = ctypes.addressof(self.prog)

    def install(self) -> None:
        prctl = self.libc.prctl
        if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self.addr, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def filter_len(bpf: bytes) -> int:
    return len(struct.unpack(f"{len(bpf) // 8}Q", bpf))
