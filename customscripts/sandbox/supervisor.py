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
  * a realtime batch's prefetched reads are answered in the child itself: when the child starts the
    first item of an event, the supervisor hands over that event's part of the prefetch (the items' own
    candle windows cut at the event's time, its dependency outputs: prefetch.Prefetched.handover), so
    most items need no read round trip at all and nothing after an item's as-of is ever in the child;
  * a killed child is certainly gone before the next child gets its request: the supervisor checks
    its pidfd or the kernel's PF_EXITING flag. Each child has its own /tmp anyway (privatetmp.py).

What the child sends is hostile in every byte: frames are size-capped, parsed strictly (finite numbers
only, bounded nesting: protocol.loads_strict), and only `call` and `item` messages exist; usage the
child might claim is never read. Any exception of the supervisor's own while serving a child ends
that child (killed, and gone before the next execution starts). Reads count against the wall
timeout: the data source gets the time that is left (datasource.read_deadline).

Where the parts live: the process handles (zygote, children, what the kernel says about them) in
children.py, the answering of read calls in reads.py; this module is the drive loop and the verdict.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from customscripts import logs
from customscripts.config import settings

from . import bwrap, protocol
from . import seccomp as seccomp_mod
from .children import EXIT_REPORT_TIMEOUT_S, Child, ExitReport, IsolationUnavailable, Zygote
from .datasource import DataSource
from .limits import SandboxLimits
from .prefetch import Handover, Prefetched
from .reads import ExecutionRequest, answer_frame, apply_data_failure, event_runs, handover, handover_events
from .results import ExecutionResult, InvalidOutput, OutputValidator

log = logs.get("customscripts.sandbox")

ISOLATION_MODES = ("bwrap", "process")
__all__ = ["ExecutionRequest", "IsolationUnavailable", "Supervisor", "compiled_seccomp"]


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
        self._dying: list[Child] = []  # killed after answering; must be gone before the next child runs
        self._check_layers()
        self._bpf = compiled_seccomp()
        self._zygote: Zygote | None = None
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
        self._zygote = Zygote(source=self.source, filename=self.filename, limits=self.limits,
                               isolation=self.isolation, guards=self.guards, bpf=self._bpf)

    def _finish_zygote(self) -> None:
        assert self._zygote is not None
        self._zygote.wait_ready()
        for _ in range(self.prefork):
            self._zygote.request_spawn()
        logs.event(log, "sandbox zygote ready", isolation=self.isolation, guards=self.guards,
                   preloaded=self._zygote.info.get("preloaded"))

    def _zyg(self) -> Zygote:
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

    def _take_child(self, n_items: int) -> Child:
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

    def _drive(self, child: Child, reqs: list[ExecutionRequest], cache: dict[tuple, bytes]
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
        runs = event_runs(reqs)
        events = handover_events(runs, reqs)
        starts = {i for i, _ in runs}
        handed: Handover | None = None  # what the child was handed for the event it runs now
        try:
            sock.settimeout(timeout_s)
            items = [r.wire() for r in reqs]
            for i in events:
                items[i]["data"] = True  # the child waits for the event's data before this item
            protocol.send_frame(sock, {"op": "run", "items": items}, allow_nan=True)
            if 0 in events:
                handed = handover(reqs, 0, events[0])
                sock.sendall(handed.frame)
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
                    req = reqs[len(results)]
                    reply = answer_frame(msg, req, req.data or self.data, data_failures, cache, deadline)
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)  # a child that stops reading cannot hold the supervisor
                    sock.sendall(reply)
                elif op == "item":
                    now = time.perf_counter()
                    cpu_now = child.cpu_s()
                    req = reqs[len(results)]
                    res = self._item_result(msg, req, data_failures)
                    res.duration_ms = round((now - t_item) * 1000, 3)
                    item_cpu.append(None if cpu_now is None or cpu_mark is None else max(cpu_now - cpu_mark, 0.0))
                    cpu_mark = cpu_now
                    if handed is not None and req.prefetch is not None:
                        self._count_local_reads(msg.get("local"), handed, req.prefetch)
                    results.append(res)
                    data_failures = []
                    calls = 0
                    t_item = now
                    deadline = now + timeout_s
                    if len(results) == len(reqs):
                        break
                    if len(results) in events:  # the next event's data, now that this one is done
                        handed = handover(reqs, len(results), events[len(results)])
                        sock.settimeout(timeout_s)
                        sock.sendall(handed.frame)
                    elif len(results) in starts:  # an event without a handover: no local reads to count
                        handed = None
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
                apply_data_failure(failure, data_failures)
            results.append(failure)
            logs.event(log, "sandbox execution failed", status=failure.status,
                       error=(failure.error or {}).get("message"))
        if info is not None:  # the kernel's figures for the child's whole life
            cpu_end, child.cpu0 = info.cpu_ms / 1000, None
            rss_kb = info.maxrss_kb
        self._account(results, item_cpu, child.cpu0, cpu_end, rss_kb or 0, failure)
        return results

    def _count_local_reads(self, claim: Any, handed: Handover, prefetch: Prefetched) -> None:
        """The reads the child says it answered from the handover, for the prefetch's counters only:
        bounded by what this side allows and sent (a child claiming more changes no limit and makes
        no window larger than the one it was handed)."""
        if not (isinstance(claim, list) and len(claim) == 2 and all(type(x) is int for x in claim)):
            return
        prefetch.hits += min(max(claim[0], 0), self.max_calls)
        prefetch.bars = max(prefetch.bars, min(max(claim[1], 0), handed.rows))

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

    def _classify_death(self, res: ExecutionResult, info: ExitReport, killed_by_us: bool) -> None:
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
            apply_data_failure(res, failures)
        return res


def _bounded(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[:limit] + "...[truncated]"


def python_executable() -> str:
    return sys.executable
