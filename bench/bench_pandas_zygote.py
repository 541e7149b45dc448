"""What preloading pandas in the zygote costs: fork cost, memory, latency, with and without it.

Prints two tables, no assertions.
  1. fork cost: a process with the zygote's modules loaded (numpy; numpy + pandas) forks a child that
     touches nothing and exits, N times: fork+exit+reap per child and the process's RSS. This is the
     work every sandboxed execution adds between requests.
  2. the real sandbox (bubblewrap unless --isolation process), one Supervisor per row:
       * sma-numpy       the numpy SMA; pandas not preloaded (what every script that does not use
                         pandas gets: sandbox/imports.py LAZY_MODULES)
       * sma-numpy+pd    the same script in a zygote that preloaded pandas
       * sma-pandas      `bars.df["close"].rolling(20).mean()`; pandas preloaded (the script uses it)
       * sma-pandas-cold the same, pandas not preloaded: imported in each child
     with: zygote ready time, zygote RSS, each child's peak RSS (measured from outside), and execute
     latency p50/p99, paced (one call every --gap-ms) and back-to-back (each call also pays the next
     child's fork, copy-on-write faults and exit on the same 2 cores).
Run: .venv/bin/python bench/bench_pandas_zygote.py [--n 200] [--gap-ms 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time

from customscripts import logs
from customscripts.config import BASE_MODULES, settings
from customscripts.sandbox import ExecutionRequest, SampleDataSource, SandboxLimits, Supervisor

SMA_NUMPY = """
import numpy as np

def run(ctx):
    bars = get_market_data(limit=200)
    return float(np.mean(bars.close[-20:]))
"""
SMA_PANDAS = """
def run(ctx):
    df = get_market_data(limit=200).df
    return float(df["close"].rolling(20).mean().iloc[-1])
"""
FORK_PROBE = """
import os, resource, sys, time
import numpy
if sys.argv[1] == "pandas":
    import pandas
    pandas.DataFrame({"a": [1.0]}).rolling(1).mean()
n = int(sys.argv[2])
times = []
for _ in range(n):
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    times.append((time.perf_counter() - t) * 1000)
times.sort()
rss = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
print(times[len(times) // 2], times[int(len(times) * 0.99)], rss)
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def fork_cost(n: int) -> None:
    print(f"fork cost: fork + exit + reap of an idle child, {n} times, in a process holding ...")
    print(f"{'modules':16} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>8}")
    for what in ("numpy", "pandas"):
        out = subprocess.run([sys.executable, "-c", FORK_PROBE, what, str(n)], capture_output=True, text=True,
                             check=True).stdout.split()
        p50, p99, rss = map(float, out)
        print(f"{'numpy' if what == 'numpy' else 'numpy + pandas':16} {p50:8.3f} {p99:8.3f} {rss:8.1f}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        lines = [line for line in fh if line.startswith("VmRSS")]
    return int(lines[0].split()[1]) / 1024 if lines else 0.0


def sandbox_row(name: str, source: str, limits: SandboxLimits, isolation: str | None, n: int, gap_s: float,
                data: SampleDataSource, ts: float) -> None:
    started = time.perf_counter()
    with Supervisor(source, limits=limits, isolation=isolation, data=data, prefork=1) as sup:
        ready_ms = (time.perf_counter() - started) * 1000
        zygote_rss = zygote_rss_mb(sup)  # before any execution: the zygote and its idle pre-forked child
        req = ExecutionRequest("GOOG", "1d", {}, ts)
        first = sup.execute(req)
        assert first.ok, first.to_dict()
        preloaded = "pandas" in (sup.zygote_info.get("preloaded") or [])
        paced, mem = [], []
        for _ in range(n):
            t = time.perf_counter()
            res = sup.execute(req)
            paced.append((time.perf_counter() - t) * 1000)
            mem.append(res.memory_mb)
            time.sleep(gap_s)
        b2b = []
        for _ in range(n):
            t = time.perf_counter()
            sup.execute(req)
            b2b.append((time.perf_counter() - t) * 1000)
    print(f"{name:16} {'yes' if preloaded else 'no':>9} {ready_ms:9.0f} {zygote_rss:9.1f} "
          f"{statistics.median(mem):9.1f} {pct(paced, 50):8.2f} {pct(paced, 99):8.2f} "
          f"{pct(b2b, 50):8.2f} {pct(b2b, 99):8.2f}")


def zygote_rss_mb(sup: Supervisor) -> float:
    """The zygote's RSS from the host's /proc: the largest process under the one the supervisor started
    (bwrap, then python; or python itself in process mode)."""
    host_pid = sup._zyg().proc.pid
    best = 0.0
    for pid in [host_pid, *_descendants(host_pid)]:
        try:
            best = max(best, rss_mb(pid))
        except OSError:
            continue
    return best


def _descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = fh.read().split()
    except OSError:
        return []
    out = []
    for c in children:
        out.append(int(c))
        out += _descendants(int(c))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--forks", type=int, default=500)
    ap.add_argument("--gap-ms", type=float, default=5.0)
    ap.add_argument("--isolation", choices=("bwrap", "process"), default=None)
    args = ap.parse_args()
    logs.setup_console()
    fork_cost(args.forks)
    print()
    tier = settings().tier("pro")
    assert tier is not None
    base = SandboxLimits.from_tier(tier)
    with_pandas = dataclasses.replace(base, allowed_modules=frozenset(BASE_MODULES))
    without = dataclasses.replace(base, allowed_modules=frozenset(BASE_MODULES - {"pandas"}))
    data = SampleDataSource().preload()
    ts = data.latest_time("GOOG")
    print(f"sandbox ({args.isolation or settings().isolation_mode}), {args.n} executes per row; paced every "
          f"{args.gap_ms} ms, then back-to-back; memory = each child's peak RSS (median)")
    print(f"{'script':16} {'preloaded':>9} {'ready ms':>9} {'zyg RSS':>9} {'child MB':>9} {'p50':>8} {'p99':>8} "
          f"{'b2b p50':>8} {'b2b p99':>8}")
    gap = args.gap_ms / 1000
    sandbox_row("sma-numpy", SMA_NUMPY, with_pandas, args.isolation, args.n, gap, data, ts)
    sandbox_row("sma-numpy+pd", SMA_NUMPY + "\nimport pandas\n", with_pandas, args.isolation, args.n, gap, data, ts)
    sandbox_row("sma-pandas", SMA_PANDAS, with_pandas, args.isolation, args.n, gap, data, ts)
    sandbox_row("sma-pandas-cold", SMA_PANDAS, without, args.isolation, max(10, args.n // 10), gap, data, ts)
    print(f"\n(pid {os.getpid()}; fresh `python -c 'import numpy, pandas'` for reference: see bench_isolation.py)")


if __name__ == "__main__":
    main()
