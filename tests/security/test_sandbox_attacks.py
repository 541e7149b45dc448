"""Hostile scripts against the real sandbox (bubblewrap + rlimits + seccomp + import guards).

Every case asserts containment twice over: the status is not ok (where the attack should fail), and
the side effect did not happen (no connection reached the test's listeners, no marker file exists,
no host secret or file content came back). The suite runs in two modes: all layers, and with the
Python-level guard layer switched off (SandboxLimits.py_guards=False / CS_SANDBOX_PY_GUARDS=0), where
the OS layers alone must hold. Cases that only exercise the import policy are skipped in that mode.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from customscripts.sandbox import ExecutionResult, bwrap

from .conftest import CANARY, GOOG_TS, Listener, make_supervisor, request

pytestmark = pytest.mark.security

NOT_OK = frozenset({"error", "timeout", "denied", "invalid_output", "dependency_failed"})
HOST_PASSWD = (Path("/etc/passwd").read_text().splitlines()[0] if os.path.exists("/etc/passwd")
               else "root:x:0:0")


@dataclass
class Case:
    id: str
    src: str
    expect: frozenset[str] = NOT_OK
    policy_only: bool = False  # purely an import-policy case: skipped when the Python guards are off
    limits: dict = field(default_factory=dict)
    check: Callable[[ExecutionResult], None] | None = None


def _marshal_payload() -> str:
    code = compile("import os\nrc = os.system('touch @MARKER@')\nassert rc == 0, rc\n", "<payload>", "exec")
    return repr(marshal.dumps(code))


CASES: list[Case] = [
    # --- network ---------------------------------------------------------------------------------
    Case("tcp_loopback_listener", """
import socket
def run(ctx):
    s = socket.create_connection(("127.0.0.1", @PORT@), timeout=0.2)
    return 1
"""),
    Case("tcp_external", """
import socket
def run(ctx):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.2)
    s.connect(("1.1.1.1", 80))
    return 1
"""),
    Case("tcp_ipv6", """
import socket
def run(ctx):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.connect(("::1", @PORT@))
    return 1
"""),
    Case("udp_sendto", """
import socket
def run(ctx):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("127.0.0.1", @UDP@))
    return 1
"""),
    Case("dns_lookup", """
import socket
def run(ctx):
    return len(socket.getaddrinfo("example.com", 80))
"""),
    Case("unix_socket_path", """
import socket
def run(ctx):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("@UNIX@")
    return 1
"""),
    Case("unix_socket_abstract", """
import socket
def run(ctx):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\\0@ABS@")
    return 1
"""),
    Case("netlink_socket", """
import socket
def run(ctx):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    return 1
"""),
    Case("packet_socket", """
import socket
def run(ctx):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    return 1
"""),
    Case("urllib_http", """
import urllib.request
def run(ctx):
    return len(urllib.request.urlopen("http://127.0.0.1:@PORT@/", timeout=0.2).read())
"""),
    Case("ctypes_raw_socket", """
import ctypes
def run(ctx):
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = libc.socket(2, 1, 0)
    assert fd >= 0, ctypes.get_errno()
    return 1
"""),
    # --- host files ------------------------------------------------------------------------------
    Case("read_etc_passwd", """
def run(ctx):
    return {"value": 1, "metadata": {"data": open("/etc/passwd").read()}}
"""),
    Case("read_proc1_environ", """
def run(ctx):
    data = open("/proc/1/environ", "rb").read().decode("latin-1")
    raise RuntimeError("environ: " + data)
""", expect=frozenset({"error"})),
    Case("read_repo_file", """
def run(ctx):
    return {"value": 1, "metadata": {"data": open("/work/main/pyproject.toml").read()}}
"""),
    Case("read_ssh_keys", """
def run(ctx):
    import os
    return {"value": 1, "metadata": {"data": os.listdir("/root/.ssh")}}
"""),
    Case("read_stack_state", """
def run(ctx):
    import os
    return {"value": 1, "metadata": {"data": os.listdir("/work/main/.state")}}
"""),
    Case("read_openfaas_secret", """
def run(ctx):
    return {"value": 1, "metadata": {"data": open("/var/openfaas/secrets/invocation-secret").read()}}
"""),
    Case("read_host_proc_mounts_dev", """
def run(ctx):
    return {"value": 1, "metadata": {"data": open("/dev/vda", "rb").read(16).hex()}}
"""),
    Case("read_zygote_memory", """
def run(ctx):
    with open("/proc/2/mem", "rb") as f:
        return {"value": 1, "metadata": {"data": f.read(16).hex()}}
"""),
    Case("symlink_escape", """
import os
def run(ctx):
    os.symlink("/etc", "/tmp/etc")
    return {"value": 1, "metadata": {"data": open("/tmp/etc/shadow").read()}}
"""),
    # --- writing ---------------------------------------------------------------------------------
    Case("write_marker_outside_tmp", """
def run(ctx):
    open("@MARKER@", "w").write("pwned")
    return 1
"""),
    Case("write_root_fs", """
def run(ctx):
    open("/pwned", "w").write("x")
    return 1
"""),
    Case("write_python_prefix", """
import os
def run(ctx):
    open(os.__file__ + ".pwned", "w").write("x")
    return 1
"""),
    Case("write_proc_sys", """
def run(ctx):
    open("/proc/sys/kernel/hostname", "w").write("pwned")
    return 1
"""),
    Case("write_global_sysctl_sysrq", """
def run(ctx):
    v = open("/proc/sys/kernel/printk_delay").read()
    open("/proc/sys/kernel/printk_delay", "w").write(v)
    open("/proc/sysrq-trigger", "w")
    return 1
"""),
    Case("fill_tmp", """
def run(ctx):
    with open("/tmp/big", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1024 * 1024))
    return 1
"""),
    Case("exhaust_fds", """
def run(ctx):
    fs = [open("/dev/null") for _ in range(5000)]
    return len(fs)
"""),
    # --- processes -------------------------------------------------------------------------------
    Case("fork", """
import os
def run(ctx):
    pid = os.fork()
    if pid == 0:
        open("@MARKER@", "w").write("child")
        os._exit(0)
    return pid
"""),
    Case("execv", """
import os
def run(ctx):
    os.execv("/bin/sh", ["sh", "-c", "touch @MARKER@"])
"""),
    Case("subprocess_run", """
import subprocess
def run(ctx):
    return subprocess.run(["touch", "@MARKER@"]).returncode
"""),
    Case("os_system", """
import os
def run(ctx):
    rc = os.system("touch @MARKER@")
    assert rc == 0, rc
    return rc
"""),
    Case("posix_spawn", """
import os
def run(ctx):
    return os.posix_spawn("/usr/bin/touch", ["touch", "@MARKER@"], {})
"""),
    Case("thread_bomb", """
import threading
def run(ctx):
    ts = [threading.Thread(target=lambda: None) for _ in range(10000)]
    for t in ts:
        t.start()
    return len(ts)
"""),
    Case("memory_bomb_bytes", """
def run(ctx):
    blocks = []
    for _ in range(64):
        blocks.append(bytearray(64 * 1024 * 1024))
    return len(blocks)
"""),
    Case("memory_bomb_numpy", """
import numpy as np
def run(ctx):
    a = np.ones(2_000_000_000)
    return float(a.sum())
"""),
    Case("cpu_loop", """
def run(ctx):
    x = 0
    while True:
        x += 1
""", expect=frozenset({"timeout"})),
    Case("sleep_past_timeout", """
import time
def run(ctx):
    time.sleep(30)
    return 1
""", expect=frozenset({"timeout"}), limits={"extra_modules": ("time",)}),
    Case("ignore_sigxcpu_and_spin", """
import signal
def run(ctx):
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    while True:
        pass
""", expect=frozenset({"timeout", "error"})),
    Case("kill_zygote", """
import os, signal
def run(ctx):
    for pid in (1, 2):
        os.kill(pid, signal.SIGKILL)
    return 1
"""),
    Case("ptrace_zygote", """
import ctypes
def run(ctx):
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    rc = libc.ptrace(16, 2, 0, 0)  # PTRACE_ATTACH
    assert rc == 0, ctypes.get_errno()
    return rc
"""),
    Case("unshare_mount", """
import ctypes
def run(ctx):
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    assert libc.unshare(0x10000000) == 0, ctypes.get_errno()  # CLONE_NEWUSER
    return 1
"""),
    Case("raise_rlimit", """
import resource
def run(ctx):
    resource.setrlimit(resource.RLIMIT_CPU, (1000, 1000))
    return 1
"""),
    # what the zygote may do and a child may not (the second seccomp stage)
    Case("socketpair_fd_passing", """
import socket, array
def run(ctx):
    a, b = socket.socketpair()
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]))])
    return 1
"""),
    Case("pidfd_open_zygote", """
import os
def run(ctx):
    fd = os.pidfd_open(2)
    return fd
"""),
    Case("prlimit_raise_fsize", """
import resource
def run(ctx):
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return 1
"""),
    # --- python-level routes (OS layers must contain the effect) ----------------------------------
    Case("subclasses_popen", """
def run(ctx):
    popen = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "Popen"]
    if not popen:
        import subprocess
        popen = [subprocess.Popen]
    popen[0](["touch", "@MARKER@"]).wait()
    return 1
"""),
    Case("frame_walk_to_socket", """
def run(ctx):
    try:
        1 / 0
    except ZeroDivisionError as e:
        f = e.__traceback__.tb_frame
    while f is not None and "socket" not in f.f_globals:
        f = f.f_back
    socket = f.f_globals["socket"]
    socket.create_connection(("127.0.0.1", @PORT@), timeout=0.2)
    return 1
"""),
    Case("generator_frame_walk", """
def run(ctx):
    def g():
        yield 1
    gen = g()
    f = gen.gi_frame.f_back or gen.gi_frame
    b = f.f_builtins
    os = b["__import__"]("os")
    assert os.system("touch @MARKER@") == 0
    return 1
"""),
    Case("gc_walk", """
import gc
def run(ctx):
    mods = [o for o in gc.get_objects() if type(o).__name__ == "module" and getattr(o, "__name__", "") == "os"]
    os = mods[0] if mods else __import__("os")
    assert os.system("touch @MARKER@") == 0
    return 1
"""),
    Case("pickle_code_loading", """
import pickle
def run(ctx):
    rc = pickle.loads(b"cos\\nsystem\\n(S'touch @MARKER@'\\ntR.")
    assert rc == 0, rc
    return 1
"""),
    Case("marshal_code_loading", """
import marshal
def run(ctx):
    exec(marshal.loads(@MARSHAL@))
    return 1
"""),
    # --- import-policy-only cases ----------------------------------------------------------------
    Case("import_os", "import os\ndef run(ctx):\n    return 1\n", policy_only=True),
    Case("import_sys", "import sys\ndef run(ctx):\n    return 1\n", policy_only=True),
    Case("import_subprocess", "import subprocess\ndef run(ctx):\n    return 1\n", policy_only=True),
    Case("import_socket", "import socket\ndef run(ctx):\n    return 1\n", policy_only=True),
    Case("import_ctypes", "import ctypes\ndef run(ctx):\n    return 1\n", policy_only=True),
    Case("importlib_trick", "def run(ctx):\n    return __import__('importlib').import_module('os').getpid()\n",
         policy_only=True),
    Case("dunder_import_builtins", "def run(ctx):\n    return __builtins__['__import__']('os').getpid()\n",
         policy_only=True),
    Case("getattr_dunder_string", """
def run(ctx):
    cls = getattr((), "__cla" + "ss__")
    return len(getattr(cls, "__subcl" + "asses__")())
""", policy_only=True),
    Case("numpy_ctypeslib", """
import numpy as np
def run(ctx):
    return str(np.ctypeslib.ctypes)
""", policy_only=True),
    Case("operator_attrgetter", """
import operator
def run(ctx):
    return len(operator.attrgetter("__class__.__base__.__subclasses__")(())())
""", policy_only=True),
    Case("builtins_eval", "def run(ctx):\n    return eval('1+1')\n", policy_only=True),
]


def _render(src: str, listener: Listener, marker: str) -> str:
    return (textwrap.dedent(src).replace("@PORT@", str(listener.tcp_port)).replace("@UDP@", str(listener.udp_port))
            .replace("@UNIX@", listener.unix_path).replace("@ABS@", listener.abstract_name)
            .replace("@MARSHAL@", _marshal_payload()).replace("@MARKER@", marker))


def _host_secrets() -> list[str]:
    secrets = [CANARY, HOST_PASSWD]
    for path in ("/work/main/pyproject.toml",):
        with contextlib.suppress(OSError, IndexError):
            secrets.append(Path(path).read_text().splitlines()[1])
    return [s for s in secrets if s]


@pytest.fixture(params=["all_layers", "os_layers_only"])
def guards(request: pytest.FixtureRequest) -> bool:
    return request.param == "all_layers"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_attack_is_contained(case: Case, guards: bool, listener: Listener, tmp_path) -> None:
    if case.policy_only and not guards:
        pytest.skip("import-policy-only case: nothing for the OS layers to contain")
    marker = str(tmp_path / "marker")
    hits_before = len(listener.hits)
    src = _render(case.src, listener, marker)
    with make_supervisor(src, guards=guards, **dict(case.limits)) as sup:
        res = sup.execute(request(user="attacker"))
        blob = json.dumps(res.to_dict())
        assert res.status in case.expect, blob
        assert res.status != "ok" or case.expect & {"ok"}, blob
        # the side effects did not happen
        assert not os.path.exists(marker), f"marker written: {blob}"
        assert len(listener.hits) == hits_before, f"listener contacted: {listener.hits} {blob}"
        for secret in _host_secrets():
            assert secret not in blob, f"host data leaked: {secret!r}"
        assert not os.path.exists("/pwned")
        if case.check:
            case.check(res)
        # the function keeps serving after the attack
        after = sup.execute(request())
        assert after.status in case.expect | {"ok", "error"}, after.to_dict()
        assert (after.error or {}).get("type") not in {"SandboxError", "SandboxProtocolError"}, after.to_dict()
        if case.id == "kill_zygote":
            assert sup.zygote_info["pid"] == 2


# --- multi-execution cases: state must not leak between executions / principals --------------------

TMP_LEAK = """
import os
def run(ctx):
    if ctx.params["phase"] == "write":
        with open("/tmp/secret-" + ctx.params["user"], "w") as f:
            f.write("s3cr3t-" + ctx.params["user"])
        return 1
    found = []
    for name in os.listdir("/tmp"):
        found.append(name)
    return {"value": len(found), "metadata": {"found": found}}
"""

STATE_LEAK = """
import numpy as np
import math
SEEN = []
def run(ctx):
    SEEN.append(ctx.params["user"])
    np.leaked_by = ctx.params["user"]
    math.pi = 3
    return {"value": len(SEEN), "metadata": {"seen": SEEN, "pi": math.pi}}
"""

BUILTINS_TAMPER = """
def run(ctx):
    if ctx.params["phase"] == "attack":
        import builtins
        builtins.abs = lambda x: 42
        builtins.len = lambda x: 42
        return 1
    return abs(-1) + len([1])
"""


def test_no_tmp_leak_between_executions(guards: bool) -> None:
    src = TMP_LEAK if not guards else TMP_LEAK.replace("import os\n", "").replace(
        "os.listdir(\"/tmp\")", "[]")
    if guards:
        pytest.skip("listing /tmp needs os, which the guard layer forbids; covered with guards off")
    with make_supervisor(src, guards=guards) as sup:
        assert sup.execute(request(phase="write", user="alice")).status == "ok"
        res = sup.execute(request(phase="read", user="bob"))
        assert res.status == "ok", res.to_dict()
        assert res.output is not None and res.output["value"] == 0, res.output


def test_no_tmp_leak_read_by_name(guards: bool) -> None:
    src = """
def run(ctx):
    if ctx.params["phase"] == "write":
        open("/tmp/secret", "w").write("s3cr3t-alice")
        return 1
    return {"value": 1, "metadata": {"data": open("/tmp/secret").read()}}
"""
    with make_supervisor(src, guards=guards) as sup:
        assert sup.execute(request(phase="write")).status == "ok"
        res = sup.execute(request(phase="read"))
        assert res.status == "error" and res.error and res.error["type"] == "FileNotFoundError", res.to_dict()
        assert "s3cr3t" not in json.dumps(res.to_dict())


def test_no_module_state_leak_between_principals(guards: bool) -> None:
    with make_supervisor(STATE_LEAK, guards=guards) as sup:
        first = sup.execute(request(user="alice"))
        second = sup.execute(request(user="bob"))
        for res in (first, second):
            assert res.status == "ok", res.to_dict()
        assert second.output and second.output["value"] == 1
        assert second.output["metadata"]["seen"] == ["bob"]
        assert "alice" not in json.dumps(second.to_dict())


def test_builtins_tampering_does_not_persist(guards: bool) -> None:
    with make_supervisor(BUILTINS_TAMPER, guards=guards) as sup:
        attack = sup.execute(request(phase="attack"))
        if guards:
            assert attack.status == "error"
        check = sup.execute(request(phase="check"))
        assert check.status == "ok" and check.output and check.output["value"] == 2, check.to_dict()


def test_lookahead_is_impossible(guards: bool) -> None:
    src = """
def run(ctx):
    bars = get_market_data(end=ctx.timestamp + 10**9, limit=50)
    return {"value": float(bars.time[-1]), "metadata": {"n": len(bars)}}
"""
    ts = GOOG_TS - 86400 * 365
    with make_supervisor(src, guards=guards) as sup:
        res = sup.execute(request().__class__("GOOG", "1d", {}, ts))
        assert res.status == "ok", res.to_dict()
        assert res.output and res.output["value"] <= ts


FORGED_EARLY_RESULT = """
import json, os, socket, struct
def run(ctx):
    if ctx.params["phase"] == "attack":
        # answer for the runtime over the child's channel (fd 3), then keep running and writing /tmp
        chan = socket.socket(fileno=3)
        frame = json.dumps({"op": "item", "kind": "ok", "value": 1, "cpu_ms": 0, "stdout": "", "stderr": ""})
        chan.sendall(struct.pack("!I", len(frame)) + frame.encode())
        i = 0
        while True:
            try:
                with open("/tmp/late-%d" % i, "w") as f:
                    f.write("written after the result")
                i += 1
            except OSError:
                pass
    names = os.listdir("/tmp")
    return {"value": len(names), "metadata": {"names": names[:5]}}
"""


def test_forged_early_result_cannot_outlive_its_execution() -> None:
    """A child that sends its result itself and keeps running is killed before the next child runs,
    and nothing it wrote after its result is visible to the next execution."""
    with make_supervisor(FORGED_EARLY_RESULT, guards=False, timeout_ms=2000) as sup:
        for _ in range(5):
            attack = sup.execute(request(phase="attack"))
            assert attack.status == "ok", attack.to_dict()
            check = sup.execute(request(phase="check"))
            assert check.status == "ok", check.to_dict()
            assert check.output is not None and check.output["value"] == 0, check.output


TMP_LOCKOUT = """
import os
def run(ctx):
    if ctx.params["phase"] == "attack":
        os.makedirs("/tmp/a/b/c")
        with open("/tmp/a/b/c/secret", "w") as f:
            f.write("s3cr3t")
        os.symlink("/tmp/a", "/tmp/link")
        for d in ("/tmp/a/b/c", "/tmp/a/b", "/tmp/a"):
            os.chmod(d, 0)
        os.chmod("/tmp", 0)
        return 1
    with open("/tmp/mine", "w") as f:
        f.write("ok")
    return {"value": len(os.listdir("/tmp")), "metadata": {"names": os.listdir("/tmp")}}
"""


def test_tmp_lockout_does_not_reach_the_next_execution() -> None:
    """chmod 000 on /tmp and on nested directories does not keep files (or a lock-out) for the next
    execution: it gets a /tmp of its own."""
    with make_supervisor(TMP_LOCKOUT, guards=False) as sup:
        assert sup.execute(request(phase="attack")).status == "ok"
        check = sup.execute(request(phase="check"))
        assert check.status == "ok", check.to_dict()
        assert check.output == {"value": 1, "timestamp": GOOG_TS, "metadata": {"names": ["mine"]}}


BINARY_FRAME_FROM_CHILD = """
import socket, struct
def run(ctx):
    chan = socket.socket(fileno=3)
    head = b'{"op":"item","kind":"ok","value":1}'
    payload = b"\\0" + struct.pack("!I", len(head)) + head + b"\\x00" * 64
    chan.sendall(struct.pack("!I", len(payload)) + payload)
    import time
    time.sleep(5)
"""


def test_supervisor_parses_only_json_from_the_child() -> None:
    """The binary frame form exists only from the supervisor to the child."""
    with make_supervisor(BINARY_FRAME_FROM_CHILD, guards=False, timeout_ms=1000) as sup:
        res = sup.execute(request())
        assert res.status == "error" and res.error and res.error["type"] == "SandboxProtocolError", res.to_dict()
        assert sup.execute(request()).status in {"error", "timeout"}  # still serving


def test_zygote_itself_runs_under_seccomp() -> None:
    """Stage one of the filter is installed in the zygote (the host sees it), stage two in each child."""
    with make_supervisor("def run(ctx):\n    return 1\n", guards=True) as sup:
        assert sup.execute(request()).status == "ok"
        zygote = sup._zygote
        assert zygote is not None
        zpid = bwrap.descendant_leaf(zygote.proc.pid, depth=2)
        assert zpid is not None
        status = Path(f"/proc/{zpid}/status").read_text()
        assert "Seccomp:\t2" in status and "Seccomp_filters:\t1" in status, status
        assert "NoNewPrivs:\t1" in status


def test_isolation_probe_inside_bwrap() -> None:
    """With guards off, look around: uid nobody, tiny read-only /, no network, scrubbed env."""
    src = """
import os
def run(ctx):
    meta = {"root": sorted(os.listdir("/")), "env": dict(os.environ), "proc": os.path.exists("/proc/self")}
    if meta["proc"]:
        status = open("/proc/self/status").read()
        meta["caps"] = [l for l in status.splitlines() if l.startswith(("CapEff", "NoNewPrivs", "Seccomp:"))]
    try:
        open("/dev/pwned", "w")
        meta["dev_writable"] = True
    except OSError:
        meta["dev_writable"] = False
    return {"value": os.getuid(), "metadata": meta}
"""
    with make_supervisor(src, guards=False) as sup:
        res = sup.execute(request())
        assert res.status == "ok", res.to_dict()
        out = res.output
        assert out is not None
        assert out["value"] == 65534
        meta = out["metadata"]
        assert set(meta["root"]) <= {"dev", "lib", "lib64", "opt", "proc", "root", "tmp", "usr"}
        assert CANARY not in json.dumps(meta["env"])
        assert meta["dev_writable"] is False
        # never a /proc inside (bwrap.options): no sysctls, no clear_refs to reset the measured peak RSS;
        # capabilities and seccomp are checked from the host (test_supervisor_trust.py)
        assert meta["proc"] is False


def test_bwrap_is_really_used_as_root() -> None:
    """--unshare-user works when the supervisor runs as root: the host sees no root-owned sandbox."""
    if os.getuid() != 0:
        pytest.skip("root-specific check")
    out = subprocess.run(["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
                          "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
                          "cat", "/proc/self/uid_map", "/proc/self/status"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert "65534" in out.stdout.splitlines()[0]
    assert "CapEff:\t0000000000000000" in out.stdout
