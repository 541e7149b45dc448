"""Helpers for realtime tests: an isolated JetStream stream per test, a scheduler run with stop rules,
and readers for what got published (rows, stream messages, latest values)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import redis

from customscripts.app import app
from customscripts.config import Settings
from customscripts.realtime.consumer import RunStats, Scheduler
from customscripts.realtime.publisher import latest_key, stream_key
from tests.waiting import wait_until


def isolated(cfg: Settings, uid: str) -> Settings:
    """Own stream, subjects and durable consumer: no other test's events reach this test's scheduler."""
    return dataclasses.replace(cfg, nats_stream=f"RT{uid.upper()}", nats_subject_prefix=f"rt{uid}.candle",
                               scheduler_durable=f"rt-{uid}", scheduler_ack_wait_s=4)


@contextlib.contextmanager
def isolated_stream(cfg: Settings, uid: str, **changes: Any) -> Iterator[Settings]:
    """`isolated` settings (with `changes`) whose stream is deleted afterwards."""
    own = dataclasses.replace(isolated(cfg, uid), **changes)
    try:
        yield own
    finally:
        delete_stream(own)


def env_for(cfg: Settings) -> dict[str, str]:
    return {**os.environ, "CS_NATS_STREAM": cfg.nats_stream, "CS_NATS_SUBJECT_PREFIX": cfg.nats_subject_prefix,
            "CS_SCHEDULER_DURABLE": cfg.scheduler_durable, "CS_SCHEDULER_ACK_WAIT_S": str(cfg.scheduler_ack_wait_s),
            "CS_SCHEDULER_FETCH_BATCH": str(cfg.scheduler_fetch_batch)}


def delete_stream(cfg: Settings) -> None:
    import nats

    async def go() -> None:
        nc = await nats.connect(cfg.nats_url, connect_timeout=5)
        try:
            await nc.jetstream().delete_stream(cfg.nats_stream)
        except Exception:
            pass
        finally:
            await nc.close()

    asyncio.run(go())


def run_scheduler(cfg: Settings, events: int, idle_exit_s: float = 60.0) -> RunStats:
    """Run one in-process replica until it has acknowledged `events` events (or idles out)."""
    evaluator = app().evaluator(cfg)
    try:
        return asyncio.run(Scheduler(evaluator, cfg).run(until=lambda s: s.events >= events,
                                                         idle_exit_s=idle_exit_s))
    finally:
        evaluator.close()


def scheduler_process(cfg: Settings, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "customscripts.realtime.scheduler", *args], env=env_for(cfg),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rows(cfg: Settings, tenant: str, script_id: str) -> list[tuple[float, str, str, Any]]:
    """(time, instrument, params_hash, value) of every stored output of the script in the tenant."""
    with psycopg.connect(cfg.pg_dsn) as conn:
        return conn.execute(
            "SELECT extract(epoch FROM time)::float8, instrument_key, params_hash, coalesce(value::text, "
            "value_json::text) FROM script_outputs WHERE tenant = %s AND script_id = %s ORDER BY time",
            (tenant, script_id)).fetchall()


def stream_counts(cfg: Settings, tenant: str, instrument: str, timeframe: str, script_id: str) -> Counter:
    """How many stream messages went out per event time for the script."""
    r = redis.Redis(host=cfg.redis_host, port=cfg.redis_port)
    counts: Counter = Counter()
    for _id, fields in r.xrange(stream_key(tenant, instrument, timeframe)):
        if fields[b"indicator"] == f"custom:{script_id}".encode():
            counts[json.loads(fields[b"payload"])["timestamp"]] += 1
    return counts


def latest(cfg: Settings, tenant: str, instrument: str, timeframe: str, script_id: str, phash: str) -> dict | None:
    r = redis.Redis(host=cfg.redis_host, port=cfg.redis_port)
    raw = r.hget(latest_key(tenant, instrument, timeframe, script_id, phash), "payload")
    return json.loads(raw) if raw else None


def subscribe(caller: Any, script_id: str, instrument: str = "GOOG", timeframe: str = "1d", **body: Any):
    """POST /scripts/{id}/subscribe as `caller` (registry_support.Caller); the response. No backfill
    unless asked (`backfill=N`): these tests follow live events."""
    return caller.call("POST", f"/scripts/{script_id}/subscribe",
                       {"instrument_key": instrument, "timeframe": timeframe, "backfill": 0, **body})


def realtime_audit(cfg: Settings, tenant: str, script_ids: list[str], expect: int,
                   columns: str = "script_id, status, user_id") -> list[tuple]:
    """`columns` (a fixed list from the test) of the tenant's realtime audit rows of these scripts, in
    order, once `expect` are written (the audit writer is asynchronous; a bounded wait)."""
    found: list[tuple] = []

    def enough() -> bool:
        with psycopg.connect(cfg.pg_dsn) as conn:
            found[:] = conn.execute(f"SELECT {columns} FROM audit WHERE tenant = %s AND action = 'realtime' "
                                    "AND script_id = ANY(%s) ORDER BY id", (tenant, script_ids)).fetchall()
        return len(found) >= expect

    wait_until(enough, interval=0.05)
    return found


def drop_subscriptions(cfg: Settings, tenant: str) -> None:
    with psycopg.connect(cfg.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM subscriptions WHERE tenant = %s", (tenant,))


def publish_candles(cfg: Settings, candles: list[dict]) -> None:
    """What the replayer sends, from candles already in memory (works while PostgreSQL is down)."""
    import nats

    from customscripts.realtime.events import ensure_stream, msg_id, subject_for

    async def go() -> None:
        nc = await nats.connect(cfg.nats_url, connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_stream(js, cfg)
            for c in candles:
                await js.publish(subject_for(cfg, c["instrument_key"], c["timeframe"]),
                                 json.dumps(c, separators=(",", ":")).encode(), stream=cfg.nats_stream,
                                 headers={"Nats-Msg-Id": msg_id(c["instrument_key"], c["timeframe"], c["time"])})
        finally:
            await nc.drain()

    asyncio.run(go())


class FunctionKiller:
    """While active, SIGKILLs every process of one script function (and its sandbox, its own process
    group) that this checkout's provider runs: the function fails outright on every call. Only the
    processes started in this stack's functions/<name> folder (`python index.py` there) are touched."""

    def __init__(self, name: str, interval_s: float = 0.01) -> None:
        from customscripts.config import settings

        self.folder = str((settings().functions_dir / name).resolve())
        self.interval_s = interval_s
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _pids(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    args = fh.read().split(b"\0")
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if b"index.py" in args and cwd == self.folder:
                found.append(int(entry))
        return found

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for pid in self._pids():
                try:
                    if os.getpgid(pid) == pid:  # the provider starts each function in its own session
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def __enter__(self) -> FunctionKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- fault injection
# Shared by tests/integration/test_faults_realtime.py and bench/bench_faults.py: a realtime replay of
# real sample candles through a chain A <- B <- C (three subscriptions), one component SIGKILLed
# mid-replay and restored, then every event checked against the no-fault reference computation.

CHAIN_A = "def run(ctx):\n    return float(get_market_data(limit=3).close[-1])\n"
CHAIN_B = "def run(ctx):\n    return get_script_output({a!r})['value'] * 2\n"
CHAIN_C = "def run(ctx):\n    return get_script_output({b!r})['value'] + 1\n"
SERVICES = ("redis", "postgres", "nats", "s3")  # the stack's own processes (pid files in .state/run)
PLATFORM_FUNCTIONS = ("gateway-fn", "registry-fn")  # run by the provider, restarted by it


def chain_reference(closes: dict[float, float]) -> dict[str, dict[float, float]]:
    """What A, B and C compute at every event with no fault at all."""
    return {"a": dict(closes), "b": {t: c * 2 for t, c in closes.items()},
            "c": {t: c * 2 + 1 for t, c in closes.items()}}


def kill_service(cfg: Settings, name: str) -> None:
    """SIGKILL a stack service's whole process group (PostgreSQL: postmaster and every backend, nothing
    flushed), and wait until its port is free."""
    from customscripts.local import stack as localstack

    pid = localstack.running_pid(cfg, name)
    assert pid is not None, f"{name} is not running"
    os.killpg(pid, signal.SIGKILL)
    port = next(s.port for s in localstack.services(cfg) if s.name == name)

    def gone() -> bool:  # every process of the group reaped (a zombie postmaster still holds its lock file)
        localstack._alive(pid)  # reaps our own child
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.getpgid(int(entry)) == pid:
                        return False
        return not localstack._port_open(port)

    assert wait_until(gone, timeout=30, interval=0.05), f"{name} did not die"


def restore_service(cfg: Settings, name: str) -> None:
    """Start a killed stack service again (the same code as `customscripts up --only NAME`)."""
    from customscripts.local import stack as localstack

    localstack.up(cfg, only={name})


def kill_function(name: str) -> int:
    """SIGKILL every process of one function this checkout's provider runs (once); the provider
    restarts it (a service at once, a script function on its next call). Returns how many it killed."""
    killer = FunctionKiller(name)
    killed = 0
    for pid in killer._pids():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def scheduler_replica(cfg: Settings, log_path: str | None = None, **env: str) -> subprocess.Popen:
    """One scheduler replica as its own process (what SIGKILL and SIGTERM are sent to)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen([sys.executable, "-m", "customscripts.realtime.scheduler"],
                                env={**env_for(cfg), **env}, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log_path:
            out.close()


def stop_replica(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM and a bounded wait (Kubernetes' grace); SIGKILL after it. The exit code, or None when
    it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


@dataclasses.dataclass
class ChainOutcome:
    """What a replay left, per script of the chain: events expected, rows, duplicates, gaps, wrong values."""

    events: int
    rows: dict[str, int]
    duplicates: dict[str, int]  # stream messages beyond one per event
    gaps: dict[str, int]  # events without a row or without a stream message
    wrong: dict[str, list]  # (time, stored, expected) where a value differs from the reference
    latest_ok: dict[str, bool]  # Redis' latest value is the last event's correct value

    @property
    def exact(self) -> bool:
        return (all(n == self.events for n in self.rows.values()) and not any(self.duplicates.values())
                and not any(self.gaps.values()) and not any(self.wrong.values()) and all(self.latest_ok.values()))


def chain_outcome(cfg: Settings, tenant: str, sids: dict[str, str], instrument: str, timeframe: str,
                  reference: dict[str, dict[float, float]]) -> ChainOutcome:
    from customscripts.outputs import params_hash

    events = len(reference["a"])
    out = ChainOutcome(events, {}, {}, {}, {}, {})
    for name, sid in sids.items():
        expected = reference[name]
        stored = {t: float(v) for t, _i, _p, v in rows(cfg, tenant, sid)}
        counts = stream_counts(cfg, tenant, instrument, timeframe, sid)
        out.rows[name] = len(stored)
        out.duplicates[name] = sum(n - 1 for n in counts.values() if n > 1)
        out.gaps[name] = sum(1 for t in expected if t not in stored or counts.get(t, 0) == 0)
        out.wrong[name] = [(t, stored[t], v) for t, v in expected.items() if t in stored and stored[t] != v]
        last = max(expected)
        value = latest(cfg, tenant, instrument, timeframe, sid, params_hash({}))
        out.latest_ok[name] = bool(value) and value["timestamp"] == last and value["value"] == expected[last]
    return out


FAULTS = ("none", "scheduler", "replica", "redis", "postgres", "nats", "s3", "function", "gateway-fn",
          "registry-fn")


@dataclasses.dataclass
class FaultRun:
    fault: str
    outcome: ChainOutcome
    recovery_s: float  # from the kill until the chain's last script published again (0: never stalled)
    replicas_exited: bool  # every replica left stopped on SIGTERM within the grace


def _count(cfg: Settings, tenant: str, sid: str) -> int:
    try:
        with psycopg.connect(cfg.pg_dsn, connect_timeout=2) as conn:
            return conn.execute("SELECT count(*) FROM script_outputs WHERE tenant = %s AND script_id = %s",
                                (tenant, sid)).fetchone()[0]
    except psycopg.Error:
        return -1  # PostgreSQL is down: unknown


def fault_replay(cfg: Settings, caller: Any, fault: str, candles: list[dict], log_path: str | None = None,
                 settle_s: float = 120.0) -> FaultRun:
    """Subscribe `caller` (registry_support.Caller) to A <- B <- C on the candles' series, publish every
    candle to JetStream, run scheduler replicas (two for `replica`), SIGKILL `fault` once a third of
    the events are published, restore it, and wait (bounded) until every event is published; then
    stop the replicas with SIGTERM and compare everything with the reference computation."""
    from customscripts.faas.naming import function_name

    assert fault in FAULTS, fault
    instrument, timeframe = candles[0]["instrument_key"], candles[0]["timeframe"]
    sids: dict[str, str] = {}
    for name, source in (("a", CHAIN_A), ("b", CHAIN_B), ("c", CHAIN_C)):
        sid = caller.sid(f"chain-{name}-{cfg.scheduler_durable[-6:]}")
        caller.create_published(sid, source.format(a=sids.get("a"), b=sids.get("b")),
                                depends_on=[f"{sids[d]}@1" for d in {"b": ["a"], "c": ["b"]}.get(name, [])])
        sids[name] = sid
    for sid in sids.values():
        resp = subscribe(caller, sid, instrument, timeframe)
        assert resp.status_code == 201, resp.text
    reference = chain_reference({c["end_time"]: float(c["close"]) for c in candles})
    publish_candles(cfg, candles)
    replicas = [scheduler_replica(cfg, log_path) for _ in range(2 if fault == "replica" else 1)]
    n = len(candles)
    recovery = 0.0
    try:
        wait_until(lambda: _count(cfg, caller.tenant, sids["c"]) >= n // 3, timeout=120, interval=0.02)
        before = _count(cfg, caller.tenant, sids["c"])
        killed_at = time.monotonic()
        if fault in ("scheduler", "replica"):
            replicas[0].kill()
            replicas[0].wait(timeout=10)
            if fault == "scheduler":
                replicas.append(scheduler_replica(cfg, log_path))
        elif fault in SERVICES:
            kill_service(cfg, fault)
            time.sleep(1.0)  # down for a while: the replicas keep trying meanwhile
            restore_service(cfg, fault)
        elif fault == "function":
            kill_function(function_name(sids["a"], 1))
        elif fault in PLATFORM_FUNCTIONS:
            kill_function(fault)
        if fault != "none":
            progressed = wait_until(lambda: _count(cfg, caller.tenant, sids["c"]) > before or before >= n,
                                    timeout=settle_s, interval=0.02)
            recovery = time.monotonic() - killed_at if progressed and before < n else 0.0
        wait_until(lambda: chain_outcome(cfg, caller.tenant, sids, instrument, timeframe, reference).exact,
                   timeout=settle_s, interval=0.25)
    finally:
        codes = [stop_replica(p) for p in replicas if p.poll() is None]
        if fault in SERVICES:
            from customscripts.local import stack as localstack

            if not localstack.running_pid(cfg, fault):
                restore_service(cfg, fault)
            # the next test starts on a whole stack: registry-fn's pool reconnects with a backoff after
            # an outage (a first request may wait it out and answer 503 backend_unavailable meanwhile)
            assert wait_until(lambda: caller.call("GET", "/scripts").status_code == 200, timeout=120,
                              interval=0.5), "registry-fn did not recover from the outage"
    outcome = chain_outcome(cfg, caller.tenant, sids, instrument, timeframe, reference)
    return FaultRun(fault, outcome, round(recovery, 2), all(c is not None for c in codes))
