"""Data gateway read latency: 200 GOOG daily bars over HTTP on loopback (token check, rate limit, SQL).

Prints p50/p99 latency of sequential reads through GatewayClient (as JSON, and as the float64
columns the sandbox supervisor asks for) and reads/s, sequential and with a few concurrent clients.
Needs the local stack (`customscripts up`); loads the sample data if missing.
Usage: .venv/bin/python bench/bench_gateway.py [--reads N] [--threads T]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time

from customscripts.config import settings
from customscripts.gateway.api import GatewayApi
from customscripts.gateway.client import GatewayClient
from customscripts.gateway.tokens import mint_execution_token
from customscripts.http import LocalServer
from customscripts.marketdata.loader import load_sample_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    base = settings()
    load_sample_data(base, echo=lambda _m: None)
    # A bench tier large enough that the limiter is exercised (one Lua call per read) but never refuses.
    bench_tier = dataclasses.replace(base.tiers["enterprise"], name="bench", rate_per_minute=10**9, burst=10**9)
    cfg = dataclasses.replace(base, tiers={**base.tiers, "bench": bench_tier})
    server = LocalServer(GatewayApi(cfg).handle, threads=8).start()
    run = f"{time.time_ns()}"

    def token(i: int) -> str:
        return mint_execution_token(user=f"bench-{run}-{i}", tenant="bench", script_id="bench", version=1,
                                    deps=[], as_of=time.time(), tier="bench", ttl_s=3600, cfg=cfg)

    try:
        client = GatewayClient(server.url, token(0))
        for _ in range(50):  # warm the pool, JIT-free but caches and connections
            client.get_market_data("GOOG", "1d", limit=200)
        reads = {"JSON": lambda: client.get_market_data("GOOG", "1d", limit=200),
                 "float64 columns, as the supervisor reads": lambda: client.market_columns("GOOG", "1d", limit=200)}
        for label, read in reads.items():
            read()
            lat: list[float] = []
            t0 = time.perf_counter()
            for _ in range(args.reads):
                t = time.perf_counter()
                read()
                lat.append((time.perf_counter() - t) * 1000)
            seq_s = time.perf_counter() - t0
            q = statistics.quantiles(lat, n=100)
            print(f"gateway read, 200 bars over HTTP, {label} (sequential, {args.reads} reads): "
                  f"p50 {q[49]:.2f} ms  p99 {q[98]:.2f} ms  max {max(lat):.2f} ms  -> {args.reads / seq_s:.0f} reads/s")
        assert len(client.get_market_data("GOOG", "1d", limit=200)["columns"]["close"]) == 200

        per = args.reads // args.threads
        clients = [GatewayClient(server.url, token(i + 1)) for i in range(args.threads)]

        def worker(c: GatewayClient) -> None:
            for _ in range(per):
                c.get_market_data("GOOG", "1d", limit=200)

        threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        par_s = time.perf_counter() - t0
        print(f"gateway read, 200 bars over HTTP ({args.threads} concurrent clients, {per * args.threads} reads): "
              f"{per * args.threads / par_s:.0f} reads/s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
