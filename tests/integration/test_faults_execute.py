"""Fault injection during one-time executes: answered means audited, whatever dies.

A bounded stream of concurrent executes runs over the real HTTP path (client -> local provider ->
registry-fn -> the version's script function -> gateway-fn), a quarter of them through the version's
function URL (provider -> script function, authorised and completed by registry-fn through
gateway-fn). Once a third of them are answered, one component is SIGKILLed: registry-fn, gateway-fn,
the script function, the PostgreSQL postmaster, Redis, the S3 server or NATS. Services come back as an
operator's `customscripts up` brings them back (after OUTAGE_S), functions as the provider restarts
them. Afterwards:
- every execute answered 200 has exactly one audit row, with its call id and the answered status, and
  an `ok` answer carries the right value (the script adds the call's own `k` to a known close);
- every error the registry answers after authorising (throttled, the function failing) has exactly one
  row too (`throttled` / `error`);
- any other outcome (no answer, the provider's own error, 503 `audit_unavailable` or
  `registry_unavailable`: not answered as recorded) has at most one row; no call id has two;
- executes succeed again through both paths (bounded probe), and the killed service is back.

`run_fault` is the driver bench/bench_faults_execute.py runs with more executes, printing the figures.
No timed assertions: the probe loops are bounded and recovery seconds are only reported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import requests

from customscripts.config import Settings
from customscripts.execution import THROTTLED
from customscripts.faas.naming import function_name
from customscripts.local import stack as localstack
from tests.integration.realtime_support import FunctionKiller
from tests.integration.registry_support import Caller

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

SCRIPT = "def run(ctx):\n    return float(get_market_data(limit=5).close[-1]) + float(ctx.params['k'])\n"
AS_OF = 1356998400.0
OUTAGE_S = 1.0  # how long a killed service stays down before it is brought back
# errors the registry answers after the attempt was authorised: each has its row (execution.py refused)
AUDITED_ERRORS = {**{code: "throttled" for code in THROTTLED},
                  "function_error": "error", "function_unreachable": "error", "function_gone": "error"}
SERVICES = ("postgres", "redis", "s3", "nats")
FUNCTIONS = ("registry-fn", "gateway-fn", "script-function")
FAULTS = ("none", *FUNCTIONS, *SERVICES)


@dataclass
class Outcome:
    call_id: str
    k: int
    via: str  # "execute" (registry's route) or "function_url"
    sent: float  # monotonic
    answered: float | None = None
    http: int | None = None  # None: no answer (the connection dropped or timed out)
    code: str | None = None  # an error answer's code
    status: str | None = None  # a 200's execution status
    value: Any = None


@dataclass
class FaultReport:
    fault: str
    sent: int = 0
    answered_ok: int = 0  # HTTP 200 (any execution status)
    answered_error: int = 0
    unanswered: int = 0
    rows: int = 0
    without_row: list[str] = field(default_factory=list)  # answered as recorded, no row: must stay empty
    duplicates: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # a wrong value, or a row whose status is not the answer's
    recovery_s: float | None = None  # kill -> first ok answer to an execute sent after it
    recovered: bool = False  # both paths answered ok after the fault
    errors: dict[str, int] = field(default_factory=dict)  # error answers by HTTP status and code


@dataclass
class Workload:
    """One owner (own user and tenant: leases a killed replica left behind concern nobody else) and
    one published version of SCRIPT, warm; `base` is its value for k = 0."""

    cfg: Settings
    owner: Caller
    script_id: str
    base: float = 0.0

    @classmethod
    def create(cls, cfg: Settings, api: str) -> Workload:
        u = uuid.uuid4().hex[:8]
        owner = Caller(api, f"faults-{u}", f"faults-tenant-{u}", tier="enterprise")
        sid = owner.sid(f"faults-{u}")
        owner.create_published(sid, SCRIPT)
        w = cls(cfg, owner, sid)
        first = w.send(0, "execute")
        assert first.http == 200 and first.status == "ok", first
        w.base = float(first.value)
        assert w.send(1, "function_url").status == "ok"  # the function URL path is warm too
        return w

    def send(self, k: int, via: str, timeout: float = 60.0) -> Outcome:
        url = (f"{self.owner.base}/scripts/{self.script_id}/execute" if via == "execute"
               else f"{self.cfg.provider_url}/function/{function_name(self.script_id, 1)}")
        out = Outcome(uuid.uuid4().hex, k, via, time.monotonic())
        body = {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": AS_OF, "params": {"k": k}}
        try:
            resp = requests.post(url, json=body, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.owner.token}", "X-Call-Id": out.call_id})
        except requests.RequestException:
            return out
        out.answered, out.http = time.monotonic(), resp.status_code
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if resp.status_code == 200 and isinstance(answer, dict):
            out.status = answer.get("status")
            out.value = (answer.get("output") or {}).get("value")
        elif isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            out.code = answer["error"].get("code")
        return out


# ------------------------------------------------------------------ faults


def _function_killer(name: str) -> Callable[[], None]:
    """SIGKILL for the function's processes as they run now (found by realtime_support.FunctionKiller
    beforehand, so the kill lands within a millisecond of its cue); the provider restarts it."""
    pids = FunctionKiller(name)._pids()
    assert pids, f"{name} is not running"

    def kill() -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == pid:  # the provider starts each function in its own session
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)

    return kill


def _kill_service(cfg: Settings, name: str) -> None:
    """SIGKILL the process group `customscripts up` started the service in (for PostgreSQL: the
    postmaster; its backends, each in its own session, notice and exit)."""
    pid = localstack.running_pid(cfg, name)
    assert pid is not None, f"{name} is not running"
    os.killpg(pid, signal.SIGKILL)


def restore_service(cfg: Settings, name: str, attempts: int = 60) -> None:
    """`customscripts up --only name`, again while it cannot start yet (a killed postmaster's backends
    still holding its shared memory for a moment)."""
    for _ in range(attempts):
        try:
            localstack.up(cfg, only={name})
            return
        except SystemExit:
            time.sleep(0.5)
    localstack.up(cfg, only={name})


def injector(w: Workload, fault: str) -> Callable[[], None]:
    """What kills the component, and brings a service back after OUTAGE_S (functions come back by
    themselves); prepared before the stream so the kill itself is immediate."""
    if fault == "none":
        return lambda: None
    if fault in FUNCTIONS:
        return _function_killer(function_name(w.script_id, 1) if fault == "script-function" else fault)

    def kill_and_restore() -> None:
        _kill_service(w.cfg, fault)
        time.sleep(OUTAGE_S)
        restore_service(w.cfg, fault)

    return kill_and_restore


# ------------------------------------------------------------------ the stream and its check


def stream(w: Workload, executes: int, workers: int, on_answer: Callable[[int], None]) -> list[Outcome]:
    """`executes` calls from `workers` threads, back to back; every fourth one on the function URL."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    ks = iter(range(2, executes + 2))

    def worker() -> None:
        while True:
            with lock:
                k = next(ks, None)
            if k is None:
                return
            out = w.send(k, "function_url" if k % 4 == 0 else "execute")
            with lock:
                outcomes.append(out)
                done = len(outcomes)
            on_answer(done)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return outcomes


def probe(w: Workload, attempts: int = 240) -> list[Outcome]:
    """Executes until both paths answer ok again (bounded); every attempt is returned (and checked)."""
    tried: list[Outcome] = []
    pending = {"execute", "function_url"}
    for i in range(attempts):
        via = sorted(pending)[i % len(pending)]
        out = w.send(10_000_000 + i, via, timeout=30)
        tried.append(out)
        if out.http == 200 and out.status == "ok":
            pending.discard(via)
            if not pending:
                break
        else:
            time.sleep(0.25)
    return tried


def audit_rows(cfg: Settings, call_ids: list[str]) -> dict[str, list[str]]:
    """Execute audit rows by call id (the database must be back: retried briefly if it is not yet)."""
    for attempt in range(60):
        try:
            with psycopg.connect(cfg.pg_dsn, connect_timeout=2) as conn:
                found: dict[str, list[str]] = {}
                for call_id, status in conn.execute(
                        "SELECT call_id, status FROM audit WHERE action = 'execute' AND call_id = ANY(%s) ORDER BY id",
                        (call_ids,)):
                    found.setdefault(call_id, []).append(status)
                return found
        except psycopg.OperationalError:
            if attempt == 59:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def check(w: Workload, report: FaultReport, outcomes: list[Outcome]) -> None:
    rows = audit_rows(w.cfg, [o.call_id for o in outcomes])
    report.rows = sum(len(r) for r in rows.values())
    for o in outcomes:
        found = rows.get(o.call_id, [])
        if len(found) > 1:
            report.duplicates.append(o.call_id)
        if o.http == 200:
            expected = o.status
            if o.status == "ok" and (not isinstance(o.value, (int, float)) or abs(o.value - (w.base + o.k)) > 1e-6):
                report.wrong.append(f"{o.call_id}: value {o.value!r} for k={o.k}, expected {w.base + o.k}")
        else:
            expected = AUDITED_ERRORS.get(o.code or "")
        if expected is None:
            continue  # not answered as recorded: at most one row (checked above)
        if not found:
            report.without_row.append(f"{o.call_id} ({o.via}, {o.http} {o.status or o.code})")
        elif found != [expected]:
            report.wrong.append(f"{o.call_id}: answered {o.http} {o.status or o.code}, audited {found}")


def run_fault(w: Workload, fault: str, executes: int, workers: int = 4) -> FaultReport:
    """The stream with `fault` injected once a third of it is answered, the recovery probe, the check."""
    kill_due = threading.Event()
    killed: list[float] = []
    inject = injector(w, fault)

    def killer() -> None:
        if kill_due.wait(timeout=600):
            killed.append(time.monotonic())
            inject()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcomes = stream(w, executes, workers, lambda done: kill_due.set() if done >= executes // 3 else None)
    kill_due.set()
    thread.join(timeout=600)
    assert not thread.is_alive(), f"{fault}: the injection did not end"
    tried = probe(w)
    report = FaultReport(fault, sent=len(outcomes) + len(tried))
    everything = outcomes + tried
    for o in everything:
        if o.http is None:
            report.unanswered += 1
        elif o.http == 200:
            report.answered_ok += 1
        else:
            report.answered_error += 1
            key = f"{o.http} {o.code or '-'}"
            report.errors[key] = report.errors.get(key, 0) + 1
    report.recovered = {o.via for o in tried if o.status == "ok"} == {"execute", "function_url"}
    after = [o.answered for o in everything if killed and o.sent >= killed[0] and o.status == "ok" and o.answered]
    report.recovery_s = (min(after) - killed[0]) if after else None
    check(w, report, everything)
    return report


# ------------------------------------------------------------------ tests


@pytest.fixture
def workload(stack: Settings, api: str) -> Workload:
    return Workload.create(stack, api)


@pytest.mark.parametrize("fault", FAULTS)
def test_every_answered_execute_is_audited_once_whatever_is_killed(fault: str, workload: Workload, stack: Settings):
    try:
        report = run_fault(workload, fault, executes=30)
    finally:
        if fault in SERVICES:  # whatever happened, the rest of the suite gets a whole stack
            restore_service(stack, fault)
    assert report.without_row == [], report
    assert report.duplicates == [], report
    assert report.wrong == [], report
    assert report.recovered, report
    assert report.answered_ok > 0, report
    if fault in SERVICES:
        assert localstack.status(stack)[fault]["healthy"], f"{fault} is not back"


SPIN = ("def run(ctx):\n    n = 0\n    for i in range(20_000_000):  # about a second: the database dies meanwhile\n"
        "        n += i\n    return float(ctx.params['k'])\n")


def test_no_execute_is_answered_as_done_while_its_row_cannot_be_committed(stack: Settings, api: str):
    """PostgreSQL dies while the script runs and stays down until the executes are answered: neither
    path may answer 200 (no row can be durable); they answer 503 `audit_unavailable` after
    CS_AUDIT_WAIT_S (or `backend_unavailable` had the registry needed the database before running).
    The row is kept and written once the database is back: never twice."""
    w = Workload.create(stack, api)
    owner, sid = w.owner, w.owner.sid(f"spin-{uuid.uuid4().hex[:8]}")
    owner.create_published(sid, SPIN)
    spin = Workload(stack, owner, sid)
    assert spin.send(5, "execute").value == 5.0  # deployed and warm
    outcomes: list[Outcome] = []
    threads = [threading.Thread(target=lambda via=via: outcomes.append(spin.send(7, via)))
               for via in ("execute", "function_url")]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)  # both are running their script by now
        _kill_service(stack, "postgres")
        for t in threads:
            t.join(timeout=120)
    finally:
        restore_service(stack, "postgres")
    assert len(outcomes) == 2
    for o in outcomes:
        assert o.http == 503 and o.code in ("audit_unavailable", "backend_unavailable"), o
    assert all(len(r) == 1 for r in audit_rows(stack, [o.call_id for o in outcomes]).values())
    assert {o.via for o in probe(spin) if o.status == "ok"} == {"execute", "function_url"}
