"""Each execution's own /tmp: a fresh tmpfs in the child's own mount namespace (layer of its own).

Why not one /tmp wiped between runs: whatever outlives an execution (a child the supervisor failed to
kill, a file it left) would meet the next execution's files, possibly another tenant's. Here every
child, between fork and user code, unshares its mount namespace and mounts a new tmpfs over the
sandbox's tmp directory, capped in bytes (`size=`) and in inodes (`nr_inodes=`, so a flood of empty
files cannot make the next execution slow), then drops every capability. Nobody else ever sees that
tmpfs, and it disappears with the child: there is nothing to wipe.

Where the capability to mount comes from:
  * bwrap: the zygote keeps CAP_SYS_ADMIN inside the sandbox's user namespace (`--cap-add`), which
    owns its mount namespace; it never runs user code, and every child drops it before user code;
  * process: the zygote first enters a user namespace of its own (`enter_own_user_namespace`,
    mapping only its own uid and gid), which gives it the same and takes every host capability away.
If neither works, the zygote's start-up probe fails and the supervisor refuses to run scripts.
Runs inside the sandbox: stdlib only.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivateTmpUnavailable(OSError):
    """The kernel or the container refused a step; the message names it."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return libc


def _check(rc: int, step: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise PrivateTmpUnavailable(err, f"{step}: {os.strerror(err)}")


def enter_own_user_namespace() -> None:
    """process mode, once in the zygote: a user and mount namespace of its own, mapping only its own
    uid and gid (the unprivileged form the kernel allows; needs /proc/self)."""
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc().unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    except OSError as exc:
        raise PrivateTmpUnavailable(exc.errno or 0, f"user namespace maps: {exc}") from None


class PrivateTmp:
    """Prepared once in the zygote (libc and arguments), applied in each child before user code."""

    def __init__(self, path: str, size_mb: int, inodes: int) -> None:
        self.libc = _libc()
        self.path = path.encode()
        self.options = f"size={int(size_mb) * 1024 * 1024},nr_inodes={int(inodes)},mode=0700".encode()
        self.header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        self.no_caps = (_CapData * 2)()

    def enter(self) -> None:
        """Own mount namespace, a new capped tmpfs at the tmp path as the working directory, and no
        capabilities left. Raises PrivateTmpUnavailable naming the step that failed."""
        libc = self.libc
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        _check(libc.mount(b"tmpfs", self.path, b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, self.options),
               "mount tmpfs")
        os.chdir(self.path)
        _check(libc.capset(ctypes.byref(self.header), self.no_caps), "capset (drop all)")


def probe(tmp: PrivateTmp) -> str | None:
    """Fork a child that takes a private /tmp and checks what it can see; None if it works, else why.
    Run by the zygote at start-up, under the same seccomp stage as every child."""
    read_end, write_end = os.pipe()
    marker = "cs-private-tmp-probe"
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            os.close(read_end)
            tmp.enter()
            with open(marker, "w") as fh:
                fh.write("x")
            ok = True
        except BaseException as exc:
            os.write(write_end, str(exc)[:500].encode())
        finally:
            os._exit(0 if ok else 1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        reason = fh.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return reason or f"probe exited with status {status}"
    if os.path.exists(os.path.join(tmp.path.decode(), marker)):
        return "a child's tmpfs was visible outside its mount namespace"
    return None
