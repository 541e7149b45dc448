"""The function budget against the local provider: never more than N script functions deployed.

The provider is given the same hard cap as the budget (like CE's 15), so a budget bug would surface
as a 400 from the provider. Last use is tracked in memory and, when a redis-server binary is
available, in a private Redis (the `cs:functions:lru` sorted set several registry replicas share).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from customscripts.faas.budget import BudgetExhausted, FunctionBudget, MemoryLru, RedisLru
from customscripts.faas.client import OpenFaaSClient
from customscripts.faas.naming import function_name
from customscripts.faas.provider import Provider
from tests.integration.test_provider_api import AUTH, make_template, version_spec

BUDGET = 3


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Provider, OpenFaaSClient, Path, Path]]:
    tpl = make_template(tmp_path)
    functions = tmp_path / "functions"
    provider = Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=functions, idle_s=60,
                        user=AUTH[0], password=AUTH[1], secrets={"invocation-secret": "s"},
                        max_functions=BUDGET + 1).start()  # +1: one platform function below
    client = OpenFaaSClient(provider.url, *AUTH)
    # a platform function occupies the provider but never counts against (or is evicted by) the budget
    platform = version_spec(tpl, functions, "platform", 1)
    platform["labels"]["com.customscripts.kind"] = "platform"
    client.deploy(platform)
    try:
        yield provider, client, tpl, functions
    finally:
        client.close()
        provider.stop()


@pytest.fixture
def redis_client(tmp_path: Path) -> Iterator[object]:
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("redis-server not installed")
    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield client
    finally:
        proc.terminate()
        proc.wait(5)


def run_versions(provider: Provider, client: OpenFaaSClient, budget: FunctionBudget, tpl: Path,
                 functions: Path, versions: list[int], pinned: set[str] | None = None) -> list[int]:
    """Use each version in turn (ensure_deployed + invoke); returns the max deployed/running seen."""
    peaks = []
    seen: set[str] = set()
    for version in versions:
        name = budget.ensure_deployed("sig", version,
                                      lambda v=version: client.deploy(version_spec(tpl, functions, "sig", v)))
        assert client.invoke(name).status == 200
        listed = client.list()
        scripts = [f for f in listed if f["labels"].get("com.customscripts.kind") == "script"]
        running = [f for f in scripts if f["availableReplicas"]]
        peaks.append(max(len(scripts), len(running)))
        assert len(scripts) <= BUDGET and len(running) <= BUDGET
        assert "cs-platform-v1" in {f["name"] for f in listed}
        names = {f["name"] for f in scripts}
        seen |= names
        for pin in (pinned or set()) & seen:  # once deployed, a pinned version stays deployed
            assert pin in names, f"pinned {pin} was evicted"
    return peaks


def test_budget_evicts_lru_and_redeploys(setup) -> None:
    provider, client, tpl, functions = setup
    budget = FunctionBudget(client, budget=BUDGET, lru=MemoryLru(), cache_s=0)
    peaks = run_versions(provider, client, budget, tpl, functions, [1, 2, 3, 4, 5, 1, 2, 5, 3])
    assert max(peaks) == BUDGET
    # LRU order: after using 1,2,5,3 the three most recent are 2,5,3
    assert sorted(budget.deployed()) == sorted(function_name("sig", v) for v in (2, 3, 5))


def test_pinned_versions_are_never_evicted(setup) -> None:
    provider, client, tpl, functions = setup
    pinned = {function_name("sig", 1), function_name("sig", 2)}
    budget = FunctionBudget(client, budget=BUDGET, lru=MemoryLru(), pinned=lambda: pinned, cache_s=0)
    run_versions(provider, client, budget, tpl, functions, [1, 2, 3, 4, 5, 3, 4, 5, 1], pinned=pinned)
    assert set(budget.deployed()) >= pinned
    # everything pinned and the budget full: a clear 503
    pinned.update({function_name("sig", 5)})
    with pytest.raises(BudgetExhausted) as err:
        budget.ensure_deployed("sig", 6, lambda: client.deploy(version_spec(tpl, functions, "sig", 6)))
    assert err.value.status == 503
    assert len(budget.deployed()) == BUDGET


def test_budget_shared_through_redis(setup, redis_client) -> None:
    """Two registry replicas (two budgets) share one LRU: the least recently used by *either* goes."""
    provider, client, tpl, functions = setup
    replica_a = FunctionBudget(client, budget=BUDGET, lru=RedisLru(redis_client), cache_s=0, touch_every_s=0)
    replica_b = FunctionBudget(client, budget=BUDGET, lru=RedisLru(redis_client), cache_s=0, touch_every_s=0)
    run_versions(provider, client, replica_a, tpl, functions, [1, 2, 3])
    time.sleep(0.01)
    run_versions(provider, client, replica_b, tpl, functions, [1])  # 1 is now the most recent
    run_versions(provider, client, replica_a, tpl, functions, [4])  # evicts 2, the LRU across replicas
    assert sorted(replica_b.deployed()) == sorted(function_name("sig", v) for v in (1, 3, 4))
    scores = redis_client.zrange("cs:functions:lru", 0, -1)
    assert function_name("sig", 2).encode() not in scores
    assert redis_client.get("cs:functions:lock") is None  # the lease is released


def test_cached_fast_path_and_forget(setup) -> None:
    _provider, client, tpl, functions = setup
    deploys = []

    def deploy() -> None:
        deploys.append(1)
        client.deploy(version_spec(tpl, functions, "sig", 1))

    budget = FunctionBudget(client, budget=BUDGET, lru=MemoryLru(), cache_s=60)
    assert budget.ensure_deployed("sig", 1, deploy) == "cs-sig-v1"
    assert budget.ensure_deployed("sig", 1, deploy) == "cs-sig-v1"
    assert len(deploys) == 1
    client.delete("cs-sig-v1")  # evicted elsewhere; the caller sees a 404 and forgets
    budget.forget("cs-sig-v1")
    budget.ensure_deployed("sig", 1, deploy)
    assert len(deploys) == 2 and client.exists("cs-sig-v1")
