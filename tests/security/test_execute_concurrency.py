"""Issue 10, item 6 (registry side): no tenant can stall the others with concurrent executes.

Attacks over the real HTTP path (registry-fn behind the local provider) with scripts that spin
until their wall timeout: the hostile excess is refused with 429 before any function is invoked,
other tenants' API calls and executes still answer, executes never take every registry-fn worker,
and every slot comes back (after completion, and after a crashed holder's lease runs out).
Assertions are on statuses and completion, never on times.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from customscripts.auth import decode_token
from customscripts.registry.concurrency import ExecuteSlots, tenant_key, user_key
from tests.integration.registry_support import Caller, error_code
from tests.waiting import wait_until

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

SPIN = "def run(ctx):\n    while True:\n        pass\n"
SPIN_LIMITS = {"timeout_ms": 500}


@pytest.fixture
def r(stack) -> redis.Redis:
    return redis.Redis(host=stack.redis_host, port=stack.redis_port)


def execute(caller: Caller, script_id: str) -> requests.Response:
    return caller.call("POST", f"/scripts/{script_id}/execute", {"instrument_key": "GOOG", "timeframe": "1d"})


def flood(calls: list[Callable[[], requests.Response]]) -> tuple[ThreadPoolExecutor, list]:
    """Start every call at once (a barrier releases them together); returns the pool and futures."""
    barrier = threading.Barrier(len(calls))

    def fire(call: Callable[[], requests.Response]) -> requests.Response:
        barrier.wait(timeout=30)
        return call()

    pool = ThreadPoolExecutor(len(calls))
    return pool, [pool.submit(fire, call) for call in calls]


def assert_refused(resp: requests.Response, code: str) -> None:
    assert error_code(resp) == code, resp.text
    assert int(resp.headers["Retry-After"]) >= 1


def registry_inflight_cap(stack) -> int:
    """How many executes one registry-fn process runs at once, from its deployed configuration."""
    from customscripts.faas.client import OpenFaaSClient

    with OpenFaaSClient(stack.provider_url, stack.openfaas_user, stack.openfaas_password) as client:
        env = client.describe("registry-fn").get("envVars") or {}
    threads = int(env.get("CS_FN_THREADS") or 8)
    assert int(env.get("CS_EXECUTE_MAX_INFLIGHT") or threads * 3 // 4) < threads
    return max(1, min(int(env.get("CS_EXECUTE_MAX_INFLIGHT") or threads * 3 // 4), threads - 1))


def in_flight(r: redis.Redis, tenants: list[str]) -> int:
    return sum(r.zcard(tenant_key(t)) for t in tenants)


def test_hostile_executes_are_capped_per_user_and_tenant_and_others_still_answer(api, stack, uid, r):
    tier = stack.tiers["pro"]
    per_user, per_tenant = tier.max_concurrent_executes_per_user, tier.max_concurrent_executes_per_tenant
    victim = Caller(api, f"victim-{uid}", f"calm-{uid}")
    quiet = victim.sid(f"quiet-{uid}")
    victim.create_published(quiet, "def run(ctx):\n    return 1.0\n")
    assert execute(victim, quiet).json()["status"] == "ok"  # its function is running
    hostile_tenant = f"hostile-{uid}"
    users = [Caller(api, f"h{n}-{uid}", hostile_tenant) for n in range(3)]
    spin = {}
    for user in users:
        spin[user.user_id] = user.sid(f"spin-{user.user_id}")
        user.create_published(spin[user.user_id], SPIN, limits=SPIN_LIMITS)
    attempts = per_user + 1  # each user asks for one more than their own cap; together over the tenant's
    calls = [(u, lambda u=u: execute(u, spin[u.user_id])) for u in users for _ in range(attempts)]
    pool, futures = flood([c for _, c in calls])
    try:
        assert wait_until(lambda: r.zcard(tenant_key(hostile_tenant)) >= per_tenant, timeout=30)
        # While the hostile tenant holds every slot it may have, the other tenant is served.
        assert victim.call("GET", f"/scripts/{quiet}").status_code == 200
        assert victim.call("GET", "/subscriptions").status_code == 200
        calm = execute(victim, quiet)
        assert calm.status_code == 200 and calm.json()["status"] == "ok", calm.text
        results = [(user, f.result(timeout=120)) for (user, _), f in zip(calls, futures, strict=True)]
    finally:
        pool.shutdown(wait=True)
    admitted = {u.user_id: 0 for u in users}
    for user, resp in results:
        if resp.status_code == 200:
            assert resp.json()["status"] == "timeout", resp.text
            admitted[user.user_id] += 1
        else:
            assert resp.status_code == 429, resp.text
            assert_refused(resp, "too_many_concurrent_executes")
            assert resp.json()["error"]["details"]["scope"] in ("user", "tenant")
    assert all(n <= per_user for n in admitted.values()), admitted
    assert 0 < sum(admitted.values()) <= per_tenant, admitted
    # Every slot came back with the executes; the next one is admitted and runs.
    keys = [tenant_key(hostile_tenant), *(user_key(hostile_tenant, u.user_id) for u in users)]
    assert all(r.zcard(k) == 0 for k in keys)
    assert execute(users[0], spin[users[0].user_id]).status_code == 200


def test_executes_never_take_every_registry_worker(api, stack, uid, r):
    """Several tenants together ask for more executes than one registry-fn process may run: the
    excess is a 503 with Retry-After, and the rest of the API keeps answering meanwhile."""
    per_tenant = stack.tiers["pro"].max_concurrent_executes_per_tenant
    per_user = stack.tiers["pro"].max_concurrent_executes_per_user
    inflight_cap = registry_inflight_cap(stack)
    tenants = [f"crowd{n}-{uid}" for n in range(inflight_cap // per_tenant + 1)]
    calls = []
    for tenant in tenants:
        author = Caller(api, f"a-{tenant}", tenant)
        sid = author.sid(f"spin-{tenant}")
        author.create_published(sid, SPIN, limits=SPIN_LIMITS, permissions={"allowed_users": [
            f"u{n}-{tenant}" for n in range(per_tenant // per_user)]})
        for n in range(per_tenant // per_user):
            user = Caller(api, f"u{n}-{tenant}", tenant)
            calls += [lambda user=user, sid=sid: execute(user, sid)] * per_user
    victim = Caller(api, f"victim-{uid}", f"calm-{uid}")
    pool, futures = flood(calls)
    try:
        assert wait_until(lambda: in_flight(r, tenants) >= inflight_cap, timeout=30)
        assert victim.call("GET", "/openapi.json").status_code == 200
        assert victim.create(f"still-{uid}").status_code == 201
        assert victim.call("GET", f"/scripts/still-{uid}").status_code == 200
        results = [f.result(timeout=300) for f in futures]
    finally:
        pool.shutdown(wait=True)
    statuses = sorted({resp.status_code for resp in results})
    assert set(statuses) <= {200, 429, 503}, statuses
    refused = [resp for resp in results if resp.status_code == 503]
    assert refused, statuses
    for resp in refused:
        assert_refused(resp, "execute_capacity")
    assert in_flight(r, tenants) == 0


def test_a_crashed_replicas_slots_come_back_when_their_lease_runs_out(api, stack, uid, r):
    """A replica that dies while holding slots never releases them: their leases expire on their
    own. The crashed replica is played by this process, configured with a short lease."""
    user = Caller(api, f"crash-{uid}", f"crashed-{uid}")
    sid = user.sid(f"quick-{uid}")
    user.create_published(sid, "def run(ctx):\n    return 1.0\n")
    principal = decode_token(user.token)
    tier = stack.tiers["pro"]
    replica = ExecuteSlots(dataclasses.replace(stack, execute_lease_slack_s=0.0), r)
    for n in range(tier.max_concurrent_executes_per_user):
        replica.acquire(principal, tier, lease_s=1.5, call_id=f"crashed-{uid}-{n}")  # never released
    refused = execute(user, sid)
    assert refused.status_code == 429, refused.text
    assert_refused(refused, "too_many_concurrent_executes")
    assert refused.json()["error"]["details"]["scope"] == "user"
    assert wait_until(lambda: execute(user, sid).status_code == 200, timeout=15, interval=0.2)
    assert r.zcard(user_key(user.tenant, user.user_id)) == 0
