"""Other tenants' one-time execute latency while a hostile tenant holds 8 concurrent executes.

Three phases in one run, all over HTTP on loopback against the local stack (brought up as
`customscripts up` does, sample data loaded):
  idle   the victim tenant's executes alone (an SMA over 200 GOOG bars, as in bench_execute.py);
  spin   the same while another tenant keeps 8 executes in flight on 4 scripts (its share of the
         function budget) that spin until their wall timeout, re-issued as soon as they return;
  reads  the same while those 8 scripts instead read market data as fast as they can until
         their wall timeout.
The hostile tenant uses 2 users x 4 executes (its tier's caps: 4 per user, 8 per tenant); one more
concurrent execute from it is refused (429) and is counted. Prints p50/p99 per phase and the
ratio of each loaded phase to idle (goal: p99 within 2x, DESIGN 5).
Usage: .venv/bin/python bench/bench_hostile_concurrency.py [--n 300] [--timeout-ms 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid

import requests

from customscripts.auth import issue_user_token
from customscripts.config import settings
from customscripts.http import KeepAlivePool
from customscripts.local import stack as localstack
from customscripts.marketdata.loader import load_sample_data

VICTIM = """
import numpy as np

def run(ctx):
    close = get_market_data(limit=200).close
    return float(np.mean(close[-20:]))
"""
SPIN = "def run(ctx):\n    while True:\n        pass\n"
READS = """
def run(ctx):
    n = 0
    while True:
        try:
            get_market_data(limit=200, start=ctx.timestamp - (n % 500 + 1) * 86400)
        except Exception:
            pass
        n += 1
"""
HOSTILE_USERS, PER_USER = 2, 4
# the functions the 8 executes hold: as many as the hostile tenant's share of the function budget
# keeps deployed on the local stack (4 of registry-fn's 13), two executes each (one runs, one waits
# at the function); more scripts would only churn its own functions (evicted mid-call: 502s)
HOSTILE_FUNCTIONS = 4


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Client:
    """One user over a keep-alive connection pool (a lean client: the figure is the platform's)."""

    def __init__(self, api: str, user: str, tenant: str, tier: str = "pro") -> None:
        self.api = api
        self.auth = f"Bearer {issue_user_token(user, tenant, tier)}"
        self.pool, self.prefix = KeepAlivePool.for_url(api, maxsize=PER_USER + 1)

    def create_published(self, chosen: str, source: str, **fields: object) -> str:
        http = requests.Session()
        http.headers["Authorization"] = self.auth
        made = http.post(f"{self.api}/scripts", json={"name": chosen, "script_id": chosen, "source": source,
                                                      **fields}, timeout=30)
        made.raise_for_status()
        sid = made.json()["script_id"]
        http.post(f"{self.api}/scripts/{sid}/publish", timeout=30).raise_for_status()
        return sid

    def execute(self, sid: str, body: bytes) -> tuple[int, dict]:
        reply = self.pool.request("POST", f"{self.prefix}/scripts/{sid}/execute", body,
                                  {"Authorization": self.auth, "Content-Type": "application/json"}, timeout=120)
        try:
            return reply.status, reply.json()
        except ValueError:  # not JSON (e.g. a gateway timeout's text): the status says what happened
            return reply.status, {"text": reply.text[:200]}


class Hostile:
    """8 threads, each keeping one execute of its script in flight until stopped."""

    def __init__(self, users: list[Client], sids: list[str], body: bytes) -> None:
        self.stop = threading.Event()
        self.completed = 0
        self.statuses: dict[str, int] = {}
        self.warm: set[int] = set()  # threads whose first execute (deploy, cold start) is done
        self._lock = threading.Lock()
        own = HOSTILE_FUNCTIONS // HOSTILE_USERS  # each user runs its own scripts
        self.threads = [threading.Thread(target=self._loop, daemon=True, args=(
            i, users[i // PER_USER], sids[(i // PER_USER) * own + i % own], body))
            for i in range(HOSTILE_USERS * PER_USER)]

    def _loop(self, index: int, user: Client, sid: str, body: bytes) -> None:
        while not self.stop.is_set():
            status, result = user.execute(sid, body)
            key = str(result.get("status") if status == 200 else status)
            with self._lock:
                self.completed += 1
                self.statuses[key] = self.statuses.get(key, 0) + 1
                self.warm.add(index)

    def wait_warm(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.warm) < len(self.threads):
            if time.monotonic() > deadline:
                raise SystemExit("the hostile functions did not all answer")
            time.sleep(0.1)

    def __enter__(self) -> Hostile:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def measure(victim: Client, sid: str, body: bytes, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, result = victim.execute(sid, body)
        samples.append((time.perf_counter() - t0) * 1000)
        if status != 200 or result["status"] != "ok":
            raise SystemExit(f"victim execute answered {status}: {json.dumps(result)[:300]}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="victim executes per phase")
    parser.add_argument("--timeout-ms", type=int, default=2000, help="the hostile scripts' wall timeout")
    args = parser.parse_args()

    cfg = settings()
    localstack.up(cfg)
    load_sample_data(cfg, echo=lambda _m: None)
    uid = uuid.uuid4().hex[:8]
    api = cfg.registry_url
    body = json.dumps({"instrument_key": "GOOG", "timeframe": "1d", "timestamp": 1356998400.0}).encode()
    victim = Client(api, f"calm-{uid}", f"calm-{uid}")
    victim_sid = victim.create_published(f"sma-{uid}", VICTIM)
    hostile_tenant = f"hostile-{uid}"
    users = [Client(api, f"h{n}-{uid}", hostile_tenant) for n in range(HOSTILE_USERS)]
    extra_user = Client(api, f"h-extra-{uid}", hostile_tenant)
    probe = extra_user.create_published(f"probe-{uid}", "def run(ctx):\n    return 1.0\n")
    limits = {"limits": {"timeout_ms": args.timeout_ms}}
    n_hostile = HOSTILE_USERS * PER_USER
    own = HOSTILE_FUNCTIONS // HOSTILE_USERS
    spin = [users[i // own].create_published(f"spin{i}-{uid}", SPIN, **limits) for i in range(HOSTILE_FUNCTIONS)]
    reads = [users[i // own].create_published(f"reads{i}-{uid}", READS, **limits) for i in range(HOSTILE_FUNCTIONS)]

    for _ in range(30):  # warm the victim's function, pools and caches
        victim.execute(victim_sid, body)
    phases: dict[str, list[float]] = {"idle": measure(victim, victim_sid, body, args.n)}
    loads: dict[str, Hostile] = {}
    refused: dict[str, int] = {}
    for phase, sids in (("spin", spin), ("reads", reads)):
        with Hostile(users, sids, body) as hostile:
            hostile.wait_warm()  # its functions deployed and started; from here 8 executes are always in flight
            time.sleep(0.2)
            refused[phase] = extra_user.execute(probe, body)[0]  # a 9th concurrent one: over the tenant's cap
            phases[phase] = measure(victim, victim_sid, body, args.n)
        loads[phase] = hostile

    idle_p50, idle_p99 = statistics.median(phases["idle"]), pct(phases["idle"], 0.99)
    print(f"\nother tenants' one-time execute (SMA over 200 GOOG bars, {args.n} sequential calls per phase, "
          f"loopback) while {n_hostile} hostile executes of another tenant hold their functions "
          f"(wall timeout {args.timeout_ms} ms)")
    print(f"{'phase':44} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6}  hostile executes")
    for phase, label in (("idle", "idle"), ("spin", "8 hostile spinning until their timeout"),
                         ("reads", "8 hostile reading as fast as they can")):
        s = phases[phase]
        p50, p99 = statistics.median(s), pct(s, 0.99)
        extra = ""
        if phase in loads:
            extra = f"{loads[phase].completed} done {loads[phase].statuses}; 9th concurrent: {refused[phase]}"
        print(f"{label:44} {len(s):5d} {p50:8.2f} {p99:8.2f} {p50 / idle_p50:6.2f} {p99 / idle_p99:6.2f}  {extra}")


if __name__ == "__main__":
    main()
