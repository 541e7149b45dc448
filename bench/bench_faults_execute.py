"""Fault injection during one-time executes: per killed component, what was sent and answered, the
audit rows, answered-without-row (must be 0), duplicates and recovery seconds; a no-fault baseline in
the same run. The driver is tests/integration/test_faults_execute.py's (`run_fault`); here with more
executes. Loopback only; every killed service is brought back. Needs nothing running: it brings the
local stack up (as `customscripts up` does) and loads the sample data.
Usage: .venv/bin/python bench/bench_faults_execute.py [--executes 200] [--workers 4] [--only postgres,redis]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's tests package

from customscripts.config import settings
from customscripts.local import stack as localstack
from customscripts.marketdata.loader import load_sample_data
from tests.integration.test_faults_execute import FAULTS, SERVICES, Workload, restore_service, run_fault


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--executes", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated faults (default: all); the baseline always runs")
    args = parser.parse_args()

    cfg = settings()
    localstack.up(cfg)
    load_sample_data(cfg, echo=lambda _m: None)
    chosen = [f for f in FAULTS if not args.only or f == "none" or f in args.only.split(",")]
    reports = []
    for fault in chosen:
        w = Workload.create(cfg, cfg.registry_url)
        try:
            reports.append(run_fault(w, fault, args.executes, args.workers))
        finally:
            if fault in SERVICES:
                restore_service(cfg, fault)
        print(f"{fault}: done", file=sys.stderr)

    print(f"\none-time executes under SIGKILL ({args.executes} per fault + the recovery probe, "
          f"{args.workers} clients, 1 in 4 on the function URL)")
    head = ("fault", "sent", "200", "error", "no answer", "audit rows", "answered w/o row", "duplicates",
            "wrong", "recovery s")
    print("{:16} {:>5} {:>5} {:>6} {:>9} {:>10} {:>16} {:>10} {:>5} {:>10}".format(*head))
    failed = False
    for r in reports:
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.2f}"
        print(f"{r.fault:16} {r.sent:5d} {r.answered_ok:5d} {r.answered_error:6d} {r.unanswered:9d} {r.rows:10d} "
              f"{len(r.without_row):16d} {len(r.duplicates):10d} {len(r.wrong):5d} {recovery:>10}")
        failed |= bool(r.without_row or r.duplicates or r.wrong or not r.recovered)
    print("\nerror answers by fault:")
    for r in reports:
        if r.errors:
            print(f"  {r.fault:14} " + ", ".join(f"{k}: {n}" for k, n in sorted(r.errors.items())))
    for r in reports:
        for line in (r.without_row + r.duplicates + r.wrong)[:5]:
            print(f"  {r.fault}: {line}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
