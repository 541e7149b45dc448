"""Per-execution latency of the same script (20-period SMA over 200 bars) under each isolation style.

Prints one table. The baseline is the in-process call: the script's run(ctx) with get_market_data()
answered straight from the DataSource into numpy arrays (no serialisation, no isolation). Rows:
  * in-process + a JSON round trip of the payload (the baseline this bench used before the sandbox
    switched to binary columns; kept for comparison);
  * fork-from-zygote, back-to-back: calls issued with no gap. On 2 cores this is CPU-bound: each
    execution also costs a fork, the child's copy-on-write faults, its exit and the zygote's reaping,
    which run in the background but compete with the next call;
  * fork-from-zygote, paced: one call every --gap-ms (like requests arriving over HTTP), so the
    background work of one call is done before the next - the latency a caller sees;
  * batch of 100 (per item), process mode, a fresh `python` subprocess, bubblewrap + fresh python.
No assertions. Run: .venv/bin/python bench/bench_isolation.py [--n 300] [--gap-ms 5]
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


def in_process(data: SampleDataSource, ts: float, n: int, *, json_round_trip: bool = False) -> list[float]:
    """The script called directly; get_market_data() turns the DataSource's columns into numpy arrays
    (optionally after a JSON round trip of the payload). No isolation."""
    import numpy as np

    g: dict = {}
    exec(compile(SCRIPT, "script.py", "exec"), g)

    class _Bars:
        def __init__(self, p: dict) -> None:
            self.columns = {k: np.asarray(v, dtype=np.float64) for k, v in p["columns"].items()}
            self.close = self.columns["close"]

    def get_market_data(limit: int = 200) -> _Bars:
        payload = data.get_market_data("GOOG", "1d", limit=limit, end=ts)
        return _Bars(json.loads(json.dumps(payload)) if json_round_trip else payload)

    g["get_market_data"] = get_market_data
    out = []
    for _ in range(n):
        t = time.perf_counter()
        g["run"](None)
        out.append((time.perf_counter() - t) * 1000)
    return out


def sandboxed(sup: Supervisor, ts: float, n: int, gap_s: float = 0.0) -> list[float]:
    out = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
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
    ap.add_argument("--gap-ms", type=float, default=5.0)
    args = ap.parse_args()
    data = SampleDataSource()
    ts = data.latest_time("GOOG")
    rows = []
    in_process(data, ts, 50)
    rows.append(("in-process call (baseline)", in_process(data, ts, args.n)))
    rows.append(("in-process + JSON round trip of the data", in_process(data, ts, args.n, json_round_trip=True)))
    limits = SandboxLimits.default()
    gap = args.gap_ms / 1000
    with Supervisor(SCRIPT, limits=limits, isolation="bwrap", data=data) as sup:
        sandboxed(sup, ts, 20)
        rows.append(("fork-from-zygote bwrap, back-to-back", sandboxed(sup, ts, args.n)))
        rows.append((f"fork-from-zygote bwrap, paced {args.gap_ms:g} ms", sandboxed(sup, ts, args.n, gap)))
        rows.append(("batch of 100, per item", batched(sup, ts, max(3, args.n // 100))))
    with Supervisor(SCRIPT, limits=limits, isolation="process", data=data) as sup:
        sandboxed(sup, ts, 20)
        rows.append(("fork-from-zygote process, back-to-back", sandboxed(sup, ts, args.n)))
        rows.append((f"fork-from-zygote process, paced {args.gap_ms:g} ms", sandboxed(sup, ts, args.n, gap)))
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
