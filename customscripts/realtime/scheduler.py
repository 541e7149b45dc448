"""The realtime scheduler replica: its command line (`customscripts scheduler`,
`python -m scheduler.main`, `python -m customscripts.realtime.scheduler`).

Candle-close events in, published indicator outputs out. Where each part lives:

| part | module |
|---|---|
| the event stream contract: subjects, message ids, stream and consumer, `Event` | events.py |
| the NATS consumer loop, acknowledgements, graceful shutdown, timer ticks | consumer.py |
| a batch of events -> published outputs and a report | evaluator.py |
| due subscriptions, permission checks, evaluations, dependencies, audiences and groups | planner.py |
| chunks, the data sent along, one invocation | batches.py (prefetch.py: the candle windows) |
| a batch driven to final statuses: dependency order, answers, retries, dead letters | batchrun.py |
| circuit breakers per function and tenant | breakers.py |
| publishing, dead letters and audit rows of a batch | recording.py (publisher.py: rows, Redis) |
| what the scheduler caches about a published version | versions.py |
| the wiring of an evaluator (its invoker, pools, publisher) | customscripts/app.py, `App.evaluator` |
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from customscripts import logs
from customscripts.app import app
from customscripts.config import Settings, settings
from customscripts.realtime import metrics
from customscripts.realtime.consumer import RunStats, Scheduler

log = logs.get("customscripts.scheduler")


def run(cfg: Settings | None = None, **kwargs: Any) -> RunStats:
    """Blocking: build and run one scheduler replica (see Scheduler.run for the stop options)."""
    cfg = cfg or settings()
    evaluator = app().evaluator(cfg)
    if cfg.scheduler_metrics_port:
        metrics.serve(cfg.scheduler_metrics_port)
    try:
        return asyncio.run(Scheduler(evaluator, cfg).run(**kwargs))
    finally:
        evaluator.close()


def latency_summary(latencies: Iterable[float]) -> dict[str, float]:
    values = sorted(latencies)
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

    def pct(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)

    return {"p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(values[-1] * 1000, 1)}


def run_scheduler(argv: list[str] | None = None) -> int:
    """CLI hook (`customscripts scheduler ...`, `python -m scheduler.main`): run one replica."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="customscripts scheduler",
                                     description="Realtime scheduler: JetStream candle closes -> published outputs.")
    parser.add_argument("--max-events", type=int, default=None, help="stop after this many events")
    parser.add_argument("--idle-exit", type=float, default=None, help="stop after this many idle seconds")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    args = parser.parse_args(argv)
    cfg = settings()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    logs.setup()
    import signal

    evaluator = app().evaluator(cfg)
    scheduler = Scheduler(evaluator, cfg)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    try:
        stats = asyncio.run(scheduler.run(max_events=args.max_events, idle_exit_s=args.idle_exit))
    except KeyboardInterrupt:
        return 0
    finally:
        if not scheduler.handed_back:
            evaluator.close()
    logs.event(log, "scheduler stopped", events=stats.events, evaluations=stats.evaluations,
               statuses=dict(stats.statuses), retries=stats.retries, handed_back=scheduler.handed_back,
               **latency_summary(stats.latencies_s))
    if scheduler.handed_back:
        # its events are back in JetStream; the abandoned batch's invocation threads would hold the
        # interpreter's exit until their deadlines, so leave now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_scheduler(sys.argv[1:]))
