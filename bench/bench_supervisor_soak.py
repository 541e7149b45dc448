"""Soak: many executions incl. timeouts and memory-limit kills; supervisor RSS and fds stay flat.

Run: .venv/bin/python bench/bench_supervisor_soak.py [--n 10000]  (1/10 timeouts, 1/10 memory bombs)
"""

from __future__ import annotations

import argparse
import os
import time

from customscripts.sandbox import ExecutionRequest, SampleDataSource, SandboxLimits, Supervisor

SCRIPT = """
import numpy as np
def run(ctx):
    kind = ctx.params["kind"]
    if kind == "spin":
        while True:
            pass
    if kind == "mem":
        return len(bytearray(1 << 31))  # far over RLIMIT_AS: MemoryError at once
    return float(np.mean(get_market_data(limit=200).close[-20:]))
"""


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--timeout-ms", type=int, default=20)
    args = ap.parse_args()
    data = SampleDataSource()
    ts = data.latest_time("GOOG")
    limits = SandboxLimits.default(timeout_ms=args.timeout_ms, memory_mb=128)
    counts: dict[str, int] = {}
    with Supervisor(SCRIPT, limits=limits, data=data) as sup:
        sup.execute(ExecutionRequest("GOOG", "1d", {"kind": "ok"}, ts))
        start_rss, start_fds, t0 = rss_mb(), fds(), time.time()
        print(f"start: rss={start_rss:.1f} MB fds={start_fds}")
        for i in range(args.n):
            kind = "spin" if i % 10 == 3 else "mem" if i % 10 == 7 else "ok"
            r = sup.execute(ExecutionRequest("GOOG", "1d", {"kind": kind}, ts))
            key = f"{kind}->{r.status}"
            counts[key] = counts.get(key, 0) + 1
            if (i + 1) % max(1, args.n // 5) == 0:
                print(f"  {i + 1:6d} done  rss={rss_mb():.1f} MB fds={fds()}  {time.time() - t0:.1f}s")
        final = sup.execute(ExecutionRequest("GOOG", "1d", {"kind": "ok"}, ts))
        print(f"end:   rss={rss_mb():.1f} MB fds={fds()}  elapsed={time.time() - t0:.1f}s")
        print(f"outcomes: {dict(sorted(counts.items()))}")
        print(f"still answers: {final.status} value={final.output and final.output['value']}")


if __name__ == "__main__":
    main()
