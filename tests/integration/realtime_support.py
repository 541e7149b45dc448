"""Helpers for realtime tests: an isolated JetStream stream per test, a scheduler run with stop rules,
and readers for what got published (rows, stream messages, latest values)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import psycopg
import redis

from customscripts.config import Settings
from customscripts.realtime.publisher import latest_key, stream_key
from customscripts.realtime.scheduler import RunStats, Scheduler, build_evaluator
from tests.waiting import wait_until


def isolated(cfg: Settings, uid: str) -> Settings:
    """Own stream, subjects and durable consumer: no other test's events reach this test's scheduler."""
    return dataclasses.replace(cfg, nats_stream=f"RT{uid.upper()}", nats_subject_prefix=f"rt{uid}.candle",
                               scheduler_durable=f"rt-{uid}", scheduler_ack_wait_s=4)


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
    evaluator = build_evaluator(cfg)
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

    from customscripts.marketdata.replayer import ensure_stream, msg_id, subject_for

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
