"""bubblewrap argv for the zygote (layer a).

Why each option is here is documented next to it. The mount namespace contains only what the
interpreter needs: the Python prefix (read-only), the shared libraries, numpy (read-only), the
sandbox runtime files (read-only) and a private size-capped /tmp. Not the repository, not /etc, not
$HOME, not /work, not .state.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SANDBOX_ROOT = "/opt/cs"           # the runtime package lives at /opt/cs/customscripts/sandbox
SANDBOX_SITE = "/opt/cs/site"       # allowlisted third-party packages (numpy)
SANDBOX_UID = 65534                 # nobody inside the user namespace
SANDBOX_GID = 65534


class BwrapUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Option:
    """One bwrap option with the reason it is there (kept for documentation and tests)."""

    args: tuple[str, ...]
    why: str


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if not path:
        raise BwrapUnavailable("bubblewrap (bwrap) is not installed")
    return path


def python_prefix() -> Path:
    """The interpreter installation (stdlib, lib-dynload, libpython) - not the venv."""
    return Path(sys.base_prefix).resolve()


def third_party_paths(modules: list[str]) -> list[tuple[str, str]]:
    """(host path, sandbox path) for each allowlisted third-party package and its bundled libs."""
    out = []
    purelib = Path(sysconfig.get_paths()["purelib"])
    for mod in modules:
        for name in (mod, f"{mod}.libs", f"{mod}.py"):
            p = purelib / name
            if p.exists():
                out.append((str(p), f"{SANDBOX_SITE}/{name}"))
    return out


def options(*, tmp_size_mb: int, extra_ro: list[tuple[str, str]] | None = None) -> list[Option]:
    prefix = str(python_prefix())
    runtime_dir = str(Path(__file__).resolve().parent)
    opts = [
        Option(("--unshare-all",), "new user, pid, net, ipc, uts and cgroup namespaces: no network at all "
                                   "(only a down loopback), no view of host processes"),
        Option(("--unshare-user",), "force a user namespace even when started as root (--unshare-all "
                                    "only *tries*), so the sandbox holds no host capabilities"),
        Option(("--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)), "run as nobody inside the namespace"),
        Option(("--cap-drop", "ALL"), "empty capability bounding set"),
        Option(("--cap-add", "CAP_SYS_ADMIN"),
               "inside the sandbox's own user namespace only, for the zygote: each child mounts its own "
               "private /tmp in its own mount namespace and drops every capability before user code "
               "(privatetmp.py)"),
        Option(("--die-with-parent",), "if the supervisor dies, the whole sandbox dies (PR_SET_PDEATHSIG)"),
        Option(("--new-session",), "setsid: no controlling terminal, so no TIOCSTI injection"),
        Option(("--clearenv",), "scrubbed environment: no secrets or tokens inherited"),
        Option(("--setenv", "PATH", "/nonexistent"), "nothing to exec anyway"),
        Option(("--setenv", "OPENBLAS_NUM_THREADS", "1", "--setenv", "OMP_NUM_THREADS", "1",
                "--setenv", "MKL_NUM_THREADS", "1"), "numpy stays single-threaded (children cannot clone)"),
        Option(("--setenv", "PYTHONHASHSEED", "0", "--setenv", "PYTHONDONTWRITEBYTECODE", "1"),
               "deterministic, no bytecode writes"),
        Option(("--ro-bind", prefix, prefix), "the Python installation, read-only, at its own path"),
        Option(("--ro-bind", "/usr/lib", "/usr/lib"), "shared libraries (libc, libm, libz, libffi)"),
        Option(("--ro-bind-try", "/usr/lib64", "/usr/lib64"), "the dynamic loader"),
        Option(("--symlink", "usr/lib", "/lib"), "merged-/usr layout"),
        Option(("--symlink", "usr/lib64", "/lib64"), "merged-/usr layout (ld-linux path)"),
        Option(("--ro-bind", runtime_dir, f"{SANDBOX_ROOT}/customscripts/sandbox"),
               "only the sandbox runtime files (namespace package 'customscripts'), not the repo"),
        # no /proc at all: as root its global sysctls would be writable, and /proc/self/clear_refs would
        # let a child reset the peak RSS the supervisor measures; the supervisor reads the host's /proc
        Option(("--dev", "/dev"), "minimal /dev: null, zero, full, random, urandom, tty"),
        Option(("--size", str(tmp_size_mb * 1024 * 1024), "--tmpfs", "/tmp"),
               "the zygote's /tmp; each child mounts a fresh capped tmpfs over it in its own namespace"),
        Option(("--chdir", "/tmp"), "start in the only writable place"),
        Option(("--remount-ro", "/dev"), "no files can be created in /dev (an unsized tmpfs)"),
    ]
    for host, dest in extra_ro or []:
        opts.append(Option(("--ro-bind", host, dest), "allowlisted third-party package, read-only"))
    opts.append(Option(("--remount-ro", "/"), "the sandbox root itself is read-only (only /tmp is writable)"))
    return opts


def build_argv(python_argv: list[str], *, tmp_size_mb: int, third_party: list[str]) -> list[str]:
    argv = [find_bwrap()]
    for opt in options(tmp_size_mb=tmp_size_mb, extra_ro=third_party_paths(third_party)):
        argv.extend(opt.args)
    argv.append("--")
    argv.extend(python_argv)
    return argv


def sandbox_python() -> str:
    """The interpreter binary inside the sandbox (the base installation, not the venv symlink)."""
    exe = Path(sys.executable).resolve()
    return str(exe)


def zygote_argv(ctl_fd: int, *, sandbox: bool, third_party_dir: str | None = None) -> list[str]:
    """python -I -S: isolated mode, no site (no .pth hooks, no user site, no venv site-packages)."""
    if sandbox:
        paths = [SANDBOX_ROOT, SANDBOX_SITE]
    else:
        pkg_parent = str(Path(__file__).resolve().parent.parent.parent)
        paths = [pkg_parent, third_party_dir or sysconfig.get_paths()["purelib"]]
    boot = (f"import sys; sys.path[:0] = {paths!r}; "
            "from customscripts.sandbox.zygote import main; main()")
    return [sandbox_python() if sandbox else os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", boot,
            str(ctl_fd)]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def descendant_leaf(pid: int, depth: int = 3) -> int | None:
    """Host pid of the innermost single-line descendant (bwrap -> bwrap init -> zygote)."""
    current = pid
    for _ in range(depth):
        kids = []
        for name in os.listdir("/proc"):
            if name.isdigit() and _ppid(int(name)) == current:
                kids.append(int(name))
        if not kids:
            break
        current = min(kids)
    return current if current != pid else None


def host_vm_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
