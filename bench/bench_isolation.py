"""Per-execution latency of the same script (20-period SMA over 200 bars) under each isolation style.

Prints one table: in-process call, fork-from-zygote (sandboxed, pre-forked pool), batch of 100 items
(per item), a fresh `python` subprocess, and bubblewrap + a fresh python. No assertions.
Run: .venv/bin/python bench/bench_isolation.py [--n 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from customscripts.sandbox import ExecutionRequest, SampleDataSource, SandboxLimits, Supervisor, bwrap

SCRIPT = """
import numpy as np

def run(ctx):
    bars = get_market_data(limit=200)
    return float(np.mean(bars.close[-20:]))
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def in_process(data: SampleDataSource, ts: float, n: int) -> list[float]:
    """Same data path as the sandbox (JSON payload -> numpy), no isolation."""
    import numpy as np

    g: dict = {}
    exec(compile(SCRIPT, "script.py", "exec"), g)
    class _Bars:
        def __init__(self, p: dict) -> None:
            self.close = np.asarray(p["columns"]["close"], dtype=np.float64)
    g["get_market_data"] = lambda limit=200: _Bars(json.loads(json.dumps(
        data.get_market_data("GOOG", "1d", limit=limit, end=ts))))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        g["run"](None)
        out.append((time.perf_counter() - t) * 1000)
    return out


def sandboxed(sup: Supervisor, ts: float, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = sup.execute(ExecutionRequest("GOOG", "1d", {}, ts))
        out.append((time.perf_counter() - t) * 1000)
        assert r.status == "ok", r.to_dict()
    return out


def batched(sup: Supervisor, ts: float, batches: int, size: int = 100) -> list[float]:
    out = []
    for _ in range(batches):
        t = time.perf_counter()
        rs = sup.execute_batch([ExecutionRequest("GOOG", "1d", {}, ts) for _ in range(size)])
        out.append((time.perf_counter() - t) * 1000 / size)
        assert all(r.ok for r in rs)
    return out


FRESH = ("import json,sys,numpy as np; d=json.loads(sys.stdin.read()); "
         "print(float(np.mean(np.asarray(d['columns']['close'][-20:]))))")


def fresh_python(data: SampleDataSource, ts: float, n: int, wrap: list[str] | None = None) -> list[float]:
    payload = json.dumps(data.get_market_data("GOOG", "1d", limit=200, end=ts))
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        if wrap:
            boot = f"import sys; sys.path.insert(0, '/opt/cs/site'); {FRESH}"
            argv = [*wrap, bwrap.sandbox_python(), "-I", "-S", "-c", boot]
        else:
            argv = [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {site!r}); {FRESH}"]
        subprocess.run(argv, input=payload, capture_output=True, text=True, check=True,
                       env={"OPENBLAS_NUM_THREADS": "1"})
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--fresh-n", type=int, default=30)
    args = ap.parse_args()
    data = SampleDataSource()
    ts = data.latest_time("GOOG")
    rows = []
    rows.append(("in-process call", in_process(data, ts, args.n)))
    limits = SandboxLimits.default()
    with Supervisor(SCRIPT, limits=limits, isolation="bwrap", data=data) as sup:
        sandboxed(sup, ts, 20)
        rows.append(("fork-from-zygote (bwrap+seccomp+rlimits)", sandboxed(sup, ts, args.n)))
        rows.append(("batch of 100, per item", batched(sup, ts, max(3, args.n // 100))))
    with Supervisor(SCRIPT, limits=limits, isolation="process", data=data) as sup:
        sandboxed(sup, ts, 20)
        rows.append(("fork-from-zygote (process mode)", sandboxed(sup, ts, args.n)))
    rows.append(("fresh python subprocess", fresh_python(data, ts, args.fresh_n)))
    argv = bwrap.build_argv(["true"], tmp_size_mb=16, third_party=["numpy"])[:-2]
    rows.append(("bubblewrap + fresh python", fresh_python(data, ts, args.fresh_n, wrap=[*argv, "--"])))
    base = statistics.median(rows[0][1])
    print(f"cores={os.cpu_count()} python={sys.version.split()[0]}")
    print(f"{'mode':44} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'p50 overhead':>13}")
    for name, xs in rows:
        p50 = statistics.median(xs)
        print(f"{name:44} {len(xs):5d} {p50:9.3f} {pct(xs, 99):9.3f} {p50 - base:13.3f}")


if __name__ == "__main__":
    main()
