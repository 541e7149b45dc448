"""One-time execute in both runtimes of the local provider, in one run: functions as processes from
their build contexts (CS_PROVIDER_RUNTIME=process) and as containers of their images (=container).

For each runtime the stack's provider is restarted in it, a fresh 20-period SMA script is published
and executed: publish -> first answer (the function's cold start; in the container runtime it includes
building the version's image, its layers but the script's from the cache), then warm executes over
one keep-alive connection, p50/p99. The baseline is a fresh `python` + numpy computing the same SMA,
measured in the same run. The provider is left in process mode.
Usage: .venv/bin/python bench/bench_runtimes.py [--n 300] [--baseline 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import requests
from bench_execute import BASELINE, SCRIPT, pct

from customscripts.auth import issue_user_token
from customscripts.config import settings
from customscripts.faas import images
from customscripts.http import KeepAlivePool
from customscripts.local import stack as localstack
from customscripts.marketdata.loader import load_sample_data, read_csv, sample_csv

BODY = {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": 1356998400.0}


def restart_provider(runtime: str) -> None:
    cfg = settings()
    localstack.down(cfg, only={"provider"})
    os.environ["CS_PROVIDER_RUNTIME"] = runtime
    localstack.up(cfg, only={"provider"})


def measure(runtime: str, n: int) -> dict[str, object]:
    cfg = settings()
    uid = uuid.uuid4().hex[:8]
    token = issue_user_token(f"bench-{uid}", f"bench-{uid}", "enterprise")
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    api = cfg.registry_url
    sid = f"bench-rt-{uid}"
    http.post(f"{api}/scripts", json={"name": "bench sma", "script_id": sid, "source": SCRIPT},
              timeout=60).raise_for_status()
    http.post(f"{api}/scripts/{sid}/publish", timeout=60).raise_for_status()
    out: dict[str, object] = {}
    started = time.perf_counter()
    first = http.post(f"{api}/scripts/{sid}/execute", json=BODY, timeout=300)
    if first.status_code != 200 or first.json().get("status") != "ok":
        raise SystemExit(f"{runtime}: first execute answered {first.status_code}: {first.text[:300]}")
    step = "publish -> first answer" + (" (image build + start)" if runtime == "container" else " (start)")
    out[step] = (time.perf_counter() - started) * 1000
    pool, prefix = KeepAlivePool.for_url(api, maxsize=1)
    target = f"{prefix}/scripts/{sid}/execute"
    payload = json.dumps(BODY).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    samples: list[float] = []
    for i in range(n + 30):
        t0 = time.perf_counter()
        reply = pool.request("POST", target, payload, headers, timeout=60)
        if reply.status != 200 or reply.json()["status"] != "ok":
            raise SystemExit(f"{runtime}: execute answered {reply.status}: {reply.text[:300]}")
        if i >= 30:  # warm-up first
            samples.append((time.perf_counter() - t0) * 1000)
    out["samples"] = samples
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--baseline", type=int, default=20)
    args = parser.parse_args()
    cfg = settings()
    localstack.up(cfg)
    load_sample_data(cfg, echo=lambda _m: None)
    runtimes = ["process"]
    status = images.probe()
    if status.usable:
        runtimes.append("container")
    else:
        print(f"container runtime not measured: {status.reason}")
    results = {}
    try:
        for runtime in runtimes:
            restart_provider(runtime)
            results[runtime] = measure(runtime, args.n)
    finally:
        restart_provider("process")

    closes = [float(r.close) for r in read_csv(sample_csv("GOOG.csv"))[-200:]]
    fresh: list[float] = []
    for _ in range(args.baseline):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BASELINE], input=str(closes).encode(), check=True, capture_output=True)
        fresh.append((time.perf_counter() - t0) * 1000)
    base = statistics.median(fresh)

    print(f"\none-time execute by runtime, 20-period SMA over 200 GOOG bars ({args.n} warm calls each, loopback)")
    print(f"{'runtime / step':58} {'p50 ms':>9} {'p99 ms':>9} {'p50 / fresh python':>19}")
    for runtime, got in results.items():
        samples = got.pop("samples")
        assert isinstance(samples, list)
        p50 = statistics.median(samples)
        print(f"{runtime + ': warm execute':58} {p50:9.2f} {pct(samples, 0.99):9.2f} {p50 / base:19.3f}")
        for label, ms in got.items():
            assert isinstance(ms, float)
            print(f"{runtime + ': ' + label:58} {ms:9.0f} {'':>9} {ms / base:19.2f}")
    print(f"{'fresh `python` + numpy, same SMA (baseline)':58} {base:9.2f} {pct(fresh, 0.99):9.2f} {1:19.3f}")


if __name__ == "__main__":
    main()
