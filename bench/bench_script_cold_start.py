"""Cold start of one script function: process start -> listening -> first served execution.

Renders a version's build context (faas/build.py: the SMA script over 200 bars, sample data), starts
it the way the local provider and the image do (`python index.py` in the context, the interpreter of
a venv of only its requirements, a clean environment; port reported on CS_FN_READY_FD) and times:
process start -> port ready, the first request, and warm requests after it. Repeats --runs times (a
new process each run). No assertions. Reads are answered from the sample data in the function
(CS_FUNCTION_SAMPLE_DATA, which needs the `backtesting` package: added to this context's requirements).
Run: .venv/bin/python bench/bench_script_cold_start.py [--runs 5] [--isolation bwrap]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from customscripts.config import settings
from customscripts.faas import build
from customscripts.local.venvs import Environments
from customscripts.sandbox.invocation import mint_invocation_token
from customscripts.sandbox.sampledata import SampleDataSource

SCRIPT = """
import numpy as np

def run(ctx):
    bars = get_market_data(limit=200)
    return float(np.mean(bars.close[-20:]))
"""
SECRET = "bench-cold-start-secret"
FN = "cs-bench-cold-v1"


def make_context(root: Path) -> Path:
    meta = {"script_id": "bench-cold", "version": 1, "tier": "pro", "output_schema": {"type": "number"}}
    folder = build.render_context("bench-cold", 1, SCRIPT, meta, functions_dir=root).path
    with open(folder / "function" / "requirements.txt", "a") as reqs:
        reqs.write("backtesting\n")  # the sample data source's CSVs
    return folder


def one_run(folder: Path, python: Path, isolation: str, warm_n: int) -> dict[str, float]:
    rfd, wfd = os.pipe()
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "CS_FN_READY_FD": str(wfd), "CS_FUNCTION_NAME": FN,
           "CS_FUNCTION_SAMPLE_DATA": "1", "CS_INVOCATION_SECRET": SECRET, "CS_ISOLATION": isolation,
           "CS_SECRETS_DIR": "/nonexistent"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(python), "index.py"], cwd=folder, env=env,
                            pass_fds=(wfd,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    os.close(wfd)
    try:
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([rfd], [], [], 30)
            chunk = os.read(rfd, 64) if ready else b""
            if not chunk:
                raise RuntimeError(f"function did not start: {proc.stdout.read().decode()[-2000:]}")
            data += chunk
        t_ready = time.perf_counter()
        url = f"http://127.0.0.1:{int(data)}/"
        ts = SampleDataSource().latest_time("GOOG")
        body = json.dumps({"instrument_key": "GOOG", "timeframe": "1d", "timestamp": ts})
        http = requests.Session()

        def call() -> float:
            tok = mint_invocation_token(FN, {"user": "bench"}, 60, secret=SECRET)
            t = time.perf_counter()
            r = http.post(url, data=body, headers={"Authorization": f"Bearer {tok}"}, timeout=30)
            dt = time.perf_counter() - t
            if r.status_code != 200 or r.json().get("status") != "ok":
                proc.terminate()
                raise SystemExit(f"{r.text}\n{proc.communicate()[0].decode()[-3000:]}")
            return dt

        first = call()
        t_first = time.perf_counter()
        warm = [call() for _ in range(warm_n)]
        return {"ready_ms": (t_ready - t0) * 1000, "first_request_ms": first * 1000,
                "start_to_first_response_ms": (t_first - t0) * 1000,
                "warm_p50_ms": statistics.median(warm) * 1000}
    finally:
        os.close(rfd)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warm", type=int, default=50)
    ap.add_argument("--isolation", choices=("bwrap", "process"), default="bwrap")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cs-cold-") as tmp:
        folder = make_context(Path(tmp))
        python = Environments(settings().state_dir / "venvs").python_for(folder)
        runs = [one_run(folder, python, args.isolation, args.warm) for _ in range(args.runs)]
    print(f"cores={os.cpu_count()} isolation={args.isolation} runs={args.runs}")
    print(f"{'figure':34} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for key in ("ready_ms", "first_request_ms", "start_to_first_response_ms", "warm_p50_ms"):
        xs = [r[key] for r in runs]
        print(f"{key:34} {statistics.median(xs):10.1f} {min(xs):9.1f} {max(xs):9.1f}")


if __name__ == "__main__":
    main()
