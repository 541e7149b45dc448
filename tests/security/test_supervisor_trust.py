"""The trusted side believes nothing a child sends: attacks on the supervisor itself.

The scripts here run with the Python guard layer off, as a script that got past it would: they write
raw frames on the child's channel (fd 3). What must hold whatever they send: the child is killed and
gone before the next execution runs, the supervisor alone decides state (no `wiping`, `dirty` or
forged usage is believed), numbers are finite (no as-of clamp defeated by NaN or infinity), every
execution has its own /tmp capped in bytes and inodes, and reads count against the wall timeout.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from customscripts.gateway.client import GatewayClient
from customscripts.gateway.tokens import mint_execution_token
from customscripts.http import LocalServer, json_response
from customscripts.sandbox import SampleDataSource, SandboxLimits, Supervisor, bwrap
from customscripts.sandbox.supervisor import ExecutionRequest
from tests.waiting import wait_until

from .conftest import GOOG_TS, make_supervisor, request

pytestmark = pytest.mark.security

RAW_FRAME = """
import os, socket, struct
def run(ctx):
    chan = socket.socket(fileno=3)
    raw = bytes.fromhex(ctx.params["frame"])
    chan.sendall(struct.pack("!I", len(raw)) + raw)
    i = 0
    while True:  # keep running and writing /tmp, as an orphan would
        try:
            with open("/tmp/late-%d" % i, "w") as f:
                f.write("written after the frame")
            i += 1
        except OSError:
            pass
"""

CHECK_TMP = """
import os
def run(ctx):
    names = os.listdir("/tmp")
    return {"value": len(names), "metadata": {"names": names[:5], "dev": os.stat("/tmp").st_dev}}
"""

HOSTILE_FRAMES = {
    "deep_array": b"[" * 20_000 + b"]" * 20_000,  # within the frame size cap: RecursionError territory
    "deep_object": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "deep_inside_item": b'{"op":"item","kind":"ok","value":{"metadata":' + b"[" * 500 + b"]" * 500 + b"}}",
    "nan_in_item": b'{"op":"item","kind":"ok","value":NaN}',
    "infinity_in_call": b'{"op":"call","fn":"market","args":{"instrument_key":"GOOG","timeframe":"1d","end":Infinity}}',
    "overflow_float_in_call":
        b'{"op":"call","fn":"market","args":{"instrument_key":"GOOG","timeframe":"1d","end":1e999}}',
    "not_utf8": b'{"op":"item","kind":"ok","value":"\xff\xfe"}',
    "not_an_object": b"[1, 2, 3]",
    "wiping": b'{"op":"wiping"}',
    "fresh": b'{"op":"fresh"}',
    "dirty": b'{"op":"dirty"}',
    "exited": b'{"op":"exited","pid":1,"status":0,"utime":0,"stime":0,"maxrss_kb":0}',
    "unknown_op": b'{"op":"ready"}',
}


def _children_of(pid: int) -> set[int]:
    kids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            kids.add(int(name))
    return kids


def _zygote_pid(sup: Supervisor) -> int:
    zyg = sup._zygote
    assert zyg is not None
    if sup.isolation == "process":
        return zyg.proc.pid
    zpid = bwrap.descendant_leaf(zyg.proc.pid, depth=2)
    assert zpid is not None
    return zpid


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("name", sorted(HOSTILE_FRAMES))
def test_hostile_frame_ends_the_child_and_nothing_else(name: str) -> None:
    """Whatever frame the child sends, it is killed and gone before the next execution starts, the
    zygote keeps serving (no forced restart), and nothing it wrote is visible afterwards."""
    with make_supervisor(RAW_FRAME, guards=False, timeout_ms=10_000) as sup, \
            make_supervisor(CHECK_TMP, guards=False) as check:
        zpid = _zygote_pid(sup)
        assert wait_until(lambda: len(_children_of(zpid)) == 1)
        (attacker,) = _children_of(zpid)
        res = sup.execute(request(frame=HOSTILE_FRAMES[name].hex()))
        assert res.status in {"error", "invalid_output"}, res.to_dict()
        assert res.status != "timeout"  # no frame buys the child more time
        assert wait_until(lambda: not _alive(attacker)), "the attacking child outlived its execution"
        assert _zygote_pid(sup) == zpid  # the child cannot force a zygote restart
        after = sup.execute(request(frame=b'{"op":"item","kind":"ok","value":1}'.hex()))
        assert after.status == "ok", after.to_dict()
        seen = check.execute(request())
        assert seen.status == "ok" and seen.output and seen.output["value"] == 0, seen.to_dict()


def test_any_supervisor_failure_kills_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception of the trusted side itself while serving a child (not only the ones it expects)
    ends that child before anything else runs; the function keeps serving."""
    with make_supervisor(RAW_FRAME, guards=False, timeout_ms=10_000) as sup:
        zpid = _zygote_pid(sup)
        assert wait_until(lambda: len(_children_of(zpid)) == 1)
        (attacker,) = _children_of(zpid)
        real = sup._item_result
        for exc in (RecursionError("deep"), KeyError("x"), MemoryError(), RuntimeError("bug")):
            def failing(*_args: object, _exc: BaseException = exc) -> None:
                raise _exc

            monkeypatch.setattr(sup, "_item_result", failing)
            res = sup.execute(request(frame=b'{"op":"item","kind":"ok","value":1}'.hex()))
            assert res.status == "error" and res.error and res.error["type"] == "SandboxError", res.to_dict()
            assert wait_until(lambda a=attacker: not _alive(a))
            attacker = next(iter(_children_of(zpid) or {0}))
        monkeypatch.setattr(sup, "_item_result", real)
        ok = sup.execute(request(frame=b'{"op":"item","kind":"ok","value":7}'.hex()))
        assert ok.status == "ok" and ok.output and ok.output["value"] == 7, ok.to_dict()


LOOKAHEAD_RAW = """
import json, socket, struct
def run(ctx):
    chan = socket.socket(fileno=3)
    args = {"instrument_key": "GOOG", "timeframe": "1d", "limit": 5000}
    frame = json.dumps({"op": "call", "fn": ctx.params["fn"], "args": args})
    frame = frame.replace("}}", ', "' + ctx.params["arg"] + '": ' + ctx.params["literal"] + "}}")
    chan.sendall(struct.pack("!I", len(frame)) + frame.encode())
    (n,) = struct.unpack("!I", chan.recv(4, socket.MSG_WAITALL))
    data = chan.recv(n, socket.MSG_WAITALL)
    if data[:1] == b"\\0":
        (h,) = struct.unpack("!I", data[1:5])
        head = json.loads(data[5:5 + h])
        spec, blob, off, cols = head["f64"], data[5 + h:], 0, {}
        for name, k in spec:
            cols[name] = struct.unpack("%dd" % k, blob[off:off + 8 * k])
            off += 8 * k
        times = cols.get("time", ())
    else:
        reply = json.loads(data)
        if "err" in reply:
            raise ValueError(reply["err"]["message"])
        times = reply["ok"]["columns"]["time"]
    return {"value": max(times) if times else 0.0}
"""

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 400]


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize("arg", ["end", "start"])
def test_non_finite_numbers_never_defeat_as_of(literal: str, arg: str) -> None:
    """A hand-written read with a non-finite (or overflowing) bound gets no bar after the as-of time:
    the frame is rejected, or the read is refused."""
    as_of = GOOG_TS - 86400 * 365
    with make_supervisor(LOOKAHEAD_RAW, guards=False, timeout_ms=10_000) as sup:
        for fn in ("market", "metric"):
            req = ExecutionRequest("GOOG", "1d", {"fn": fn, "arg": arg, "literal": literal}, as_of)
            res = sup.execute(req)
            if res.status == "ok":
                assert res.output and res.output["value"] <= as_of, res.to_dict()
            assert "after" not in json.dumps(res.to_dict())


@pytest.mark.parametrize("guards", [True, False], ids=["guards", "no-guards"])
def test_non_finite_bounds_through_the_read_api(guards: bool) -> None:
    src = """
import math
def run(ctx):
    worst = 0.0
    for bound in (float("nan"), float("inf"), -float("inf")):
        for kw in ("end", "start"):
            try:
                bars = get_market_data(limit=5000, **{kw: bound})
            except Exception:
                continue
            if len(bars):
                worst = max(worst, float(bars.time[-1]))
    return worst
"""
    as_of = GOOG_TS - 86400 * 365
    with make_supervisor(src, guards=guards) as sup:
        res = sup.execute(ExecutionRequest("GOOG", "1d", {}, as_of))
        assert res.status == "ok", res.to_dict()
        assert res.output and res.output["value"] <= as_of


def test_non_finite_timestamp_is_refused() -> None:
    with make_supervisor("def run(ctx):\n    return 1\n", guards=True) as sup:
        for ts in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="finite"):
                sup.execute(ExecutionRequest("GOOG", "1d", {}, ts))
        assert sup.execute(request()).status == "ok"


FORGED_USAGE = """
import json, socket, struct, time
import numpy as np
def run(ctx):
    block = np.ones(200 * 2**20 // 8)  # touch 200 MB
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    if not ctx.params.get("forge"):
        return float(block[-1])
    chan = socket.socket(fileno=3)
    frame = json.dumps({"op": "item", "kind": "ok", "value": 1, "cpu_ms": 0.0, "maxrss_kb": 0,
                        "memory_mb": 0, "stdout": "", "stderr": ""})
    chan.sendall(struct.pack("!I", len(frame)) + frame.encode())
    chan.recv(1)
"""


@pytest.mark.parametrize("forge", [False, True], ids=["honest", "forged"])
def test_usage_is_measured_from_outside(forge: bool) -> None:
    """Memory and CPU come from the kernel (host /proc, CPU clock, wait4): a child that reports 0 MB
    and 0 ms after touching 200 MB and spinning 0.2 s of CPU is measured as it is."""
    with make_supervisor(FORGED_USAGE, guards=False, memory_mb=600, timeout_ms=20_000, cpu_seconds=20) as sup:
        res = sup.execute(request(forge=forge))
        assert res.status == "ok", res.to_dict()
        assert res.memory_mb >= 190, res.to_dict()
        assert res.cpu_ms >= 190, res.to_dict()


def test_batch_usage_is_measured_per_item_from_outside() -> None:
    src = """
import time
def run(ctx):
    t = time.process_time()
    while time.process_time() - t < ctx.params["cpu"]:
        pass
    return 1
"""
    with make_supervisor(src, guards=False, timeout_ms=20_000, cpu_seconds=20) as sup:
        results = sup.execute_batch([request(cpu=0.0), request(cpu=0.3), request(cpu=0.0)])
        assert [r.status for r in results] == ["ok"] * 3
        assert results[1].cpu_ms >= 290 and results[1].cpu_ms > results[0].cpu_ms + results[2].cpu_ms


def test_each_execution_has_its_own_tmp() -> None:
    """Not one /tmp wiped between runs: each execution's /tmp is a filesystem of its own, not the
    zygote's (which is never written)."""
    with make_supervisor(CHECK_TMP, guards=False) as sup:
        zygote_tmp = os.stat(f"/proc/{_zygote_pid(sup)}/root/tmp").st_dev
        for _ in range(3):
            res = sup.execute(request())
            assert res.status == "ok" and res.output and res.output["value"] == 0, res.to_dict()
            assert res.output["metadata"]["dev"] != zygote_tmp
        assert not os.listdir(f"/proc/{_zygote_pid(sup)}/root/tmp")


@pytest.mark.parametrize("isolation", ["bwrap", "process"])
def test_children_hold_no_capabilities_and_own_mount_namespaces(isolation: str) -> None:
    """Seen from the host: every pre-forked child, once set up (it is handed over right after the fork
    and reads its request only after its setup), has no capability left and a mount namespace of its
    own."""
    limits = SandboxLimits.default(timeout_ms=1000)
    with Supervisor("def run(ctx):\n    return 1\n", limits=limits, isolation=isolation,
                    data=SampleDataSource(), prefork=2) as sup:
        assert sup.execute(request()).status == "ok"
        zpid = _zygote_pid(sup)
        zygote_ns = os.readlink(f"/proc/{zpid}/ns/mnt")

        def set_up(pid: int) -> bool:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                return "NoNewPrivs:\t1" in status and os.readlink(f"/proc/{pid}/ns/mnt") != zygote_ns
            except OSError:
                return False

        seen: dict[int, tuple[str, str]] = {}

        def two_set_up() -> bool:  # one consistent look at both children (the pool refills under load)
            kids = _children_of(zpid)
            if len(kids) != 2 or not all(map(set_up, kids)):
                return False
            try:
                seen.clear()
                seen.update({pid: (Path(f"/proc/{pid}/status").read_text(), os.readlink(f"/proc/{pid}/ns/mnt"))
                             for pid in kids})
            except OSError:
                return False
            return _children_of(zpid) == kids

        assert wait_until(two_set_up)
        for status, _ns in seen.values():
            for field in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
                assert f"{field}:\t0000000000000000" in status, (field, status)
        assert len({zygote_ns, *(ns for _status, ns in seen.values())}) == 3


INODE_FLOOD = """
import os
def run(ctx):
    n = 0
    try:
        while n < 1_000_000:
            open("/tmp/f%d" % n, "w").close()
            n += 1
    except OSError as exc:
        return {"value": n, "metadata": {"error": exc.errno}}
    return {"value": n, "metadata": {"error": 0}}
"""


def test_tmp_inodes_are_capped_and_the_next_execution_is_unaffected() -> None:
    with make_supervisor(INODE_FLOOD, guards=False, timeout_ms=5000, cpu_seconds=5) as flood, \
            make_supervisor(CHECK_TMP, guards=False) as check:
        res = flood.execute(request())
        assert res.status == "ok", res.to_dict()
        assert res.output and res.output["value"] < flood.limits.tmp_inodes, res.output
        assert res.output["metadata"]["error"] == 28  # ENOSPC: out of inodes, not of bytes
        again = flood.execute(request())
        assert again.status == "ok" and again.output and again.output["value"] == res.output["value"]
        seen = check.execute(request())
        assert seen.status == "ok" and seen.output and seen.output["value"] == 0


class _CountingSlowSource(SampleDataSource):
    """The trusted side's data source, slow on purpose (a gateway under load)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.reads = 0

    def get_market_data(self, *args: object, **kwargs: object) -> dict:
        self.reads += 1
        threading.Event().wait(self.delay_s)
        return super().get_market_data(*args, **kwargs)  # type: ignore[arg-type]


def test_reads_count_against_the_wall_timeout() -> None:
    """1,000 slow reads cannot hold an execution past its timeout: the time a read takes is the
    execution's time."""
    src = """
def run(ctx):
    n = 0
    for i in range(1000):
        n += len(get_market_data(limit=5, end=ctx.timestamp - i * 86400))
    return n
"""
    data = _CountingSlowSource(0.02)
    limits = SandboxLimits.default(timeout_ms=400)
    with Supervisor(src, limits=limits, isolation="bwrap", data=data, prefork=1) as sup:
        res = sup.execute(request())
        assert res.status == "timeout", res.to_dict()
        assert data.reads < 1000
        assert sup.execute(request()).status == "timeout"  # and it keeps serving


def test_a_hanging_gateway_read_ends_at_the_wall_timeout() -> None:
    """GatewayClient gets the time that is left: a gateway that never answers costs the execution its
    timeout, not the client's 10 s read timeout times its retries."""
    release = threading.Event()
    calls = []

    def hang(_event: object, _context: object) -> object:
        calls.append(1)
        release.wait(30)
        return json_response({"error": {"code": "late", "message": "late"}}, 503)

    server = LocalServer(hang).start()
    try:
        token = mint_execution_token(user="u", tenant="t", script_id="s", version=1, deps=[], as_of=GOOG_TS,
                                     tier="pro", call_id="c")
        src = "def run(ctx):\n    return len(get_market_data(limit=5))\n"
        limits = SandboxLimits.default(timeout_ms=500)
        with Supervisor(src, limits=limits, isolation="bwrap", prefork=1) as sup:
            req = ExecutionRequest("GOOG", "1d", {}, GOOG_TS, data=GatewayClient(server.url, token))
            res = sup.execute(req)
            assert res.status == "timeout", res.to_dict()
            assert len(calls) == 1
    finally:
        release.set()
        server.stop()
