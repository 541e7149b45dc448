"""Realtime fan-out on the real local stack: 1,000 subscriptions (100 instruments x 10 scripts, one of
them the top of a three-level dependency chain), candle closes through JetStream, the scheduler, the
script functions (batched), and publishing to Redis + stream + TimescaleDB.

Prints two figures (DESIGN §5 targets: >= 5,000 evaluations/s, p99 <= 500 ms):
  sustained   all ticks published at once; evaluations per second until everything is published
              (its latency is mostly queueing behind the backlog: see "queued");
  paced       one tick (100 candle closes) at a time at --interval; event -> published p50/p99, and
              "queued": the part of it spent before the event's batch started (the rest is work).

Synthetic instruments SYN000..SYN099 are the real GOOG daily candles loaded under other keys.

    .venv/bin/python bench/bench_realtime.py [--instruments 100] [--ticks 20] [--paced 20] [--reads]
                                             [--no-prefetch] [--commit-cost]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg

from customscripts import outputs
from customscripts.app import app
from customscripts.auth import decode_token, issue_user_token
from customscripts.config import settings
from customscripts.local import stack as localstack
from customscripts.local.realtime_demo import drop_stream
from customscripts.marketdata.loader import load_rows, load_sample_data, read_csv, sample_csv
from customscripts.realtime.consumer import Scheduler
from customscripts.realtime.events import ensure_stream, msg_id, subject_for
from customscripts.realtime.scheduler import latency_summary

# The bench's one tenant subscribes to 10 versions: more than its default share of the function
# budget (a third of it, customscripts/faas/budget.py), so it is given that share here.
os.environ.setdefault("CS_FUNCTION_TENANT_SHARE", "10")

NO_READS = {
    "base": "def run(ctx):\n    return float(ctx.timestamp % 1000)\n",
    "plain": "def run(ctx):\n    return float(ctx.params.get('k', 1)) * (ctx.timestamp % 97)\n",
}
READS = {
    "base": "def run(ctx):\n    return float(get_market_data(limit=3).close[-1])\n",
    "plain": ("import numpy as np\n\ndef run(ctx):\n    c = np.asarray(get_market_data(limit=20).close)\n"
              "    return float(c.mean()) * float(ctx.params.get('k', 1))\n"),
}


def setup(n_instruments: int, reads: bool) -> tuple[object, list[str], list[dict]]:
    cfg = settings()
    localstack.up(cfg)
    load_sample_data(cfg, echo=lambda _m: None)
    rows = read_csv(sample_csv("GOOG.csv"))
    instruments = [f"SYN{i:03d}" for i in range(n_instruments)]
    with psycopg.connect(cfg.pg_dsn, autocommit=True) as conn:
        for key in instruments:
            load_rows(conn, key, "1d", rows)
    uid = uuid.uuid4().hex[:8]
    principal = decode_token(issue_user_token(f"bench-{uid}", f"bench-{uid}", "pro"))
    svc = app().realtime
    src = READS if reads else NO_READS
    from customscripts.registry.models import DraftCreate

    def publish(name: str, source: str, deps: list[str]) -> str:
        """Create and publish; the platform-wide script id (the registry qualifies the chosen one)."""
        sid = svc.registry.create_draft(principal, DraftCreate(name=name, script_id=name, source=source,
                                                               depends_on=deps)).script_id
        svc.registry.publish(principal, sid)
        return sid

    c0 = publish(f"b{uid}-c0", src["base"], [])
    c1 = publish(f"b{uid}-c1", f"def run(ctx):\n    return get_script_output('{c0}')['value'] * 2\n", [f"{c0}@1"])
    c2 = publish(f"b{uid}-c2", f"def run(ctx):\n    return get_script_output('{c1}')['value'] + 1\n", [f"{c1}@1"])
    chain = [c0, c1, c2]
    plain = [publish(f"b{uid}-p{i}", src["plain"], []) for i in range(7)]
    subs = []
    for key in instruments:
        for sid in chain + plain:
            params = {} if sid in chain else {"k": 2}
            subs.append(svc.subscribe(principal, sid, {"instrument_key": key, "timeframe": "1d", "params": params,
                                                          "backfill": 0}))
    return principal, instruments, subs


async def publish_ticks(cfg, instruments: list[str], times: list[float], interval: float | None) -> None:
    import nats

    nc = await nats.connect(cfg.nats_url)
    js = nc.jetstream()
    await ensure_stream(js, cfg)
    for t in times:
        started = time.monotonic()
        acks = [js.publish(subject_for(cfg, key, "1d"),
                           json.dumps({"instrument_key": key, "timeframe": "1d", "time": t, "open": 1, "high": 1,
                                       "low": 1, "close": 1, "volume": 1}).encode(),
                           stream=cfg.nats_stream, headers={"Nats-Msg-Id": msg_id(key, "1d", t)})
                for key in instruments]
        await asyncio.gather(*acks)
        if interval:
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
    await nc.drain()


def run_phase(cfg, evaluator, instruments: list[str], times: list[float], interval: float | None) -> dict:
    """One phase through a Scheduler on `evaluator`: the phases share it, as a running replica keeps
    its evaluator (its functions proven by the breakers, its caches warm) from batch to batch."""
    timings: dict[str, float] = {}
    process = evaluator.process

    def timed(events):  # where the time goes, summed over the phase's batches
        report = process(events)
        for k, v in report.timings_s.items():
            timings[k] = timings.get(k, 0.0) + v
        return report

    evaluator.process = timed  # type: ignore[method-assign]
    total = len(times) * len(instruments)
    publisher = threading.Thread(target=lambda: asyncio.run(publish_ticks(cfg, instruments, times, interval)))
    started, cpu0 = time.perf_counter(), time.process_time()
    publisher.start()
    try:
        stats = asyncio.run(Scheduler(evaluator, cfg).run(until=lambda s: s.events >= total, idle_exit_s=60))
    finally:
        evaluator.process = process  # type: ignore[method-assign]
        publisher.join()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    return {"events": stats.events, "evaluations": stats.evaluations, "statuses": dict(stats.statuses),
            "wall_s": round(wall, 2), "evaluations_per_s": round(stats.evaluations / wall),
            "batches": stats.batches, "scheduler_cpu_us_per_evaluation": round(cpu * 1e6 / max(1, stats.evaluations)),
            **latency_summary(stats.latencies_s),
            "queued": latency_summary(stats.queued_s), "prefetched_reads": stats.prefetched_reads,
            "time_in_s": {k: round(v, 2) for k, v in timings.items()}}


@contextlib.contextmanager
def commits(mode: str) -> Iterator[None]:
    """`async commit`: the publisher's history writes commit as they did before issue 13 (the
    session's default, here forced off), to measure what the synchronous commit costs in the same run."""
    if mode != "async commit":
        yield
        return
    durable = outputs.durable

    @contextlib.contextmanager
    def lazy(pool):
        with pool.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            yield conn

    outputs.durable = lazy
    try:
        yield
    finally:
        outputs.durable = durable


def measure(args: argparse.Namespace, instruments: list[str], n_subs: int) -> None:
    """Warm-up, then the sustained and paced phases (twice, interleaved, with --commit-cost)."""
    uid = uuid.uuid4().hex[:8]
    cfg = dataclasses.replace(settings(), nats_stream=f"BENCH{uid.upper()}", nats_subject_prefix=f"bench{uid}.c",
                              scheduler_durable=f"bench-{uid}")
    with psycopg.connect(cfg.pg_dsn) as conn:
        days = [r[0] for r in conn.execute(
            "SELECT extract(epoch FROM time)::float8 FROM candles WHERE instrument_key = 'GOOG' AND timeframe = '1d'"
            " ORDER BY time DESC LIMIT %s", (1 + (2 if args.commit_cost else 1) * (args.ticks + args.paced),))][::-1]
    pf = not args.no_prefetch
    print(f"subscriptions: {n_subs} ({args.instruments} instruments x 10 scripts, chain of 3); "
          f"data reads per evaluation: {'yes' if args.reads else 'no'}; prefetch: {'on' if pf else 'off'}")
    evaluator = app().evaluator(cfg)
    evaluator.prefetch = pf
    try:
        warm = run_phase(cfg, evaluator, instruments, days[:1], None)
        print("warm-up (deploys the functions):", json.dumps(warm))
        rest = days[1:]
        for mode in (("async commit", "durable") if args.commit_cost else ("",)):
            label = f" [{mode}]" if mode else ""
            with commits(mode):
                sustained = run_phase(cfg, evaluator, instruments, rest[:args.ticks], None)
                print(f"sustained{label}:", json.dumps(sustained))
                paced = run_phase(cfg, evaluator, instruments, rest[args.ticks:args.ticks + args.paced], args.interval)
                print(f"paced{label} (one tick of {args.instruments} events every {args.interval}s):",
                      json.dumps(paced))
            rest = rest[args.ticks + args.paced:]
    finally:
        evaluator.close()
        with contextlib.suppress(Exception):
            drop_stream(cfg)  # the run's own stream, with its durable consumer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=20, help="ticks for the sustained phase")
    parser.add_argument("--paced", type=int, default=20, help="ticks for the paced (latency) phase")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between paced ticks")
    parser.add_argument("--reads", action="store_true", help="every script reads market data")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="send nothing along with the batches: every read goes through gateway-fn")
    parser.add_argument("--commit-cost", action="store_true",
                        help="run the sustained and paced phases twice, interleaved: with the history writes "
                             "committed asynchronously (as before issue 13) and durably (synchronous commit)")
    args = parser.parse_args()
    _principal, instruments, subs = setup(args.instruments, args.reads)
    try:
        measure(args, instruments, len(subs))
    finally:  # an interrupted run too
        clean_up(subs[0]["tenant"])


def clean_up(tenant: str) -> None:
    """What a run leaves of its own tenant: its subscriptions (they would hold the function budget),
    and its ~44,000 outputs and Redis keys per run, which slow the next runs down (an
    aged stack measured 3,400-4,600/s where a fresh one measured 5,100-6,600/s with the same code)."""
    cfg = settings()
    with psycopg.connect(cfg.pg_dsn, autocommit=True) as conn:
        for table in ("subscriptions", "script_outputs", "realtime_dead_letters"):
            conn.execute(f"DELETE FROM {table} WHERE tenant = %s", (tenant,))
    r = app().redis
    for pattern in (f"signals:{tenant}:*", f"signals:stream:{tenant}:*", f"signals:seen:{tenant}:*"):
        keys = list(r.scan_iter(match=pattern, count=5000))
        for i in range(0, len(keys), 5000):
            r.unlink(*keys[i:i + 5000])


if __name__ == "__main__":
    main()
