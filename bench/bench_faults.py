"""Realtime fault injection on the real local stack: a replay of real sample candles (GOOG 1d, 200 by
default) through three subscriptions A <- B <- C, with one component SIGKILLed a third of the way in
and restored: the scheduler (alone), one of two replicas, Redis, PostgreSQL (postmaster and backends),
NATS, the S3 server, script A's function process, gateway-fn and registry-fn. The no-fault run is the
baseline of the same run.

Prints one row per fault: events, history rows (of the three scripts), duplicates (stream messages
beyond one per event), gaps (events without a row or message), wrong values (against the no-fault
reference computation), whether Redis' latest values are right, and recovery seconds (kill -> the
chain's last script published again). Every killed service is restored.

    .venv/bin/python bench/bench_faults.py [--candles 200] [--faults scheduler,redis,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's tests/ helpers

from customscripts.config import settings
from customscripts.local import stack as localstack
from customscripts.marketdata.loader import load_sample_data
from customscripts.marketdata.replayer import load_candles
from tests.integration.realtime_support import (
    FAULTS,
    delete_stream,
    drop_subscriptions,
    fault_replay,
    isolated,
)
from tests.integration.registry_support import Caller

START = datetime(2011, 3, 1, tzinfo=UTC).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candles", type=int, default=200)
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated; 'none' is the baseline")
    args = parser.parse_args()
    cfg = settings()
    localstack.up(cfg)
    load_sample_data(cfg, echo=lambda _m: None)
    candles = load_candles(cfg, "GOOG", "1d", START, None, args.candles)
    print(f"replay: {len(candles)} GOOG 1d candles, chain A <- B <- C (3 subscriptions), one SIGKILL a third in")
    header = f"{'fault':<12} {'events':>6} {'rows':>5} {'dup':>4} {'gaps':>5} {'wrong':>5} {'latest':>6} " \
             f"{'recovery_s':>10} {'exited':>6}"
    print(header)
    print("-" * len(header))
    for fault in [f.strip() for f in args.faults.split(",") if f.strip()]:
        uid = uuid.uuid4().hex[:10]
        rt = dataclasses.replace(isolated(cfg, uid), scheduler_fetch_batch=5)
        caller = Caller(cfg.registry_url, f"bf-{uid}", f"bf-tenant-{uid}")
        try:
            run = fault_replay(rt, caller, fault, candles, log_path=str(cfg.state_dir / "logs" / "bench-faults.log"))
        finally:
            drop_subscriptions(cfg, caller.tenant)
            delete_stream(rt)
        o = run.outcome
        print(f"{fault:<12} {o.events:>6} {sum(o.rows.values()):>5} {sum(o.duplicates.values()):>4} "
              f"{sum(o.gaps.values()):>5} {sum(len(w) for w in o.wrong.values()):>5} "
              f"{'ok' if all(o.latest_ok.values()) else 'WRONG':>6} {run.recovery_s:>10.2f} "
              f"{'yes' if run.replicas_exited else 'NO':>6}", flush=True)


if __name__ == "__main__":
    main()
