"""The function budget against the local provider and the stack's Redis: never more than N script
functions deployed, never more than its share held or pinned by one tenant.

The provider is given the same hard cap as the budget (like CE's 15), so a budget bug would surface
as a 400 from the provider. Slots, holdings and last use live in Redis (private keys per test), as
every registry-fn replica and the scheduler share them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from customscripts.faas.budget import BudgetExhausted, FunctionBudget, RedisLru, TenantShareFull
from customscripts.faas.client import OpenFaaSClient
from customscripts.faas.naming import function_name
from customscripts.http import http_status
from customscripts.local.provider import Provider
from tests.integration.test_provider_api import AUTH, make_template, version_spec

BUDGET = 4


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
def redis_client(stack) -> Iterator[redis.Redis]:
    client = redis.Redis(host=stack.redis_host, port=stack.redis_port)
    yield client
    client.close()


@pytest.fixture
def new_lru(redis_client):
    """RedisLru factory on this test's own keys; every call is another replica on the same state."""
    prefix = f"test:budget:{uuid.uuid4().hex[:10]}"

    def make() -> RedisLru:
        return RedisLru(redis_client, key=f"{prefix}:lru", lock_key=f"{prefix}:lock")

    yield make
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


def deployer(client: OpenFaaSClient, tpl: Path, functions: Path, version: int):
    return lambda: client.deploy(version_spec(tpl, functions, "sig", version))


def use(budget: FunctionBudget, client: OpenFaaSClient, tpl: Path, functions: Path, tenant: str,
        version: int) -> str:
    name = budget.ensure_deployed(tenant, "sig", version, deployer(client, tpl, functions, version))
    assert client.invoke(name).status == 200
    return name


def run_versions(provider: Provider, client: OpenFaaSClient, budget: FunctionBudget, tpl: Path,
                 functions: Path, versions: list[int], pinned: set[str] | None = None,
                 tenant: str = "t1") -> list[int]:
    """Use each version in turn (ensure_deployed + invoke); returns the max deployed/running seen."""
    peaks = []
    seen: set[str] = set()
    for version in versions:
        use(budget, client, tpl, functions, tenant, version)
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


def fn(version: int) -> str:
    return function_name("sig", version)


def test_budget_evicts_lru_and_redeploys(setup, new_lru) -> None:
    provider, client, tpl, functions = setup
    budget = FunctionBudget(client, budget=BUDGET, tenant_share=BUDGET, lru=new_lru(), cache_s=0)
    peaks = run_versions(provider, client, budget, tpl, functions, [1, 2, 3, 4, 5, 1, 2, 6, 5, 3])
    assert max(peaks) == BUDGET
    # LRU order: after using 1,2,6,5,3 the four most recent are 2,6,5,3
    assert sorted(budget.deployed()) == sorted(fn(v) for v in (2, 3, 5, 6))


def test_pinned_versions_are_never_evicted(setup, new_lru) -> None:
    provider, client, tpl, functions = setup
    pinned = {fn(1), fn(2)}
    budget = FunctionBudget(client, budget=BUDGET, tenant_share=BUDGET, lru=new_lru(),
                            pinned=lambda: {"t1": pinned}, cache_s=0)
    run_versions(provider, client, budget, tpl, functions, [1, 2, 3, 4, 5, 3, 4, 5, 1], pinned=pinned)
    assert set(budget.deployed()) >= pinned
    # everything pinned and the budget full: a clear 503 (pinned by another tenant: not t1's share)
    budget.pinned = lambda: {"t1": pinned, "t2": {fn(4), fn(5)}}
    with pytest.raises(BudgetExhausted) as err:
        use(budget, client, tpl, functions, "t3", 6)
    assert http_status(err.value) == 503 and err.value.retry_after_s
    assert len(budget.deployed()) == BUDGET


def test_budget_shared_through_redis(setup, new_lru, redis_client) -> None:
    """Two registry replicas (two budgets) share one LRU: the least recently used by *either* goes."""
    provider, client, tpl, functions = setup
    lru_a = new_lru()
    replica_a = FunctionBudget(client, budget=BUDGET, tenant_share=BUDGET, lru=lru_a, cache_s=0, touch_every_s=0)
    replica_b = FunctionBudget(client, budget=BUDGET, tenant_share=BUDGET, lru=new_lru(), cache_s=0,
                               touch_every_s=0)
    run_versions(provider, client, replica_a, tpl, functions, [1, 2, 3, 4])
    run_versions(provider, client, replica_b, tpl, functions, [1])  # 1 is now the most recent
    run_versions(provider, client, replica_a, tpl, functions, [5])  # evicts 2, the LRU across replicas
    assert sorted(replica_b.deployed()) == sorted(fn(v) for v in (1, 3, 4, 5))
    assert fn(2) not in lru_a.slots() and len(lru_a.slots()) == BUDGET
    assert redis_client.get(lru_a.lock_key) is None  # the lease is released


def test_cached_fast_path_and_forget(setup, new_lru) -> None:
    _provider, client, tpl, functions = setup
    deploys = []

    def deploy() -> None:
        deploys.append(1)
        client.deploy(version_spec(tpl, functions, "sig", 1))

    budget = FunctionBudget(client, budget=BUDGET, lru=new_lru(), cache_s=60)
    assert budget.ensure_deployed("t1", "sig", 1, deploy) == "cs-sig-v1"
    assert budget.ensure_deployed("t1", "sig", 1, deploy) == "cs-sig-v1"
    assert len(deploys) == 1
    client.delete("cs-sig-v1")  # evicted elsewhere; the caller sees a 404 and forgets
    budget.forget("cs-sig-v1")
    budget.ensure_deployed("t1", "sig", 1, deploy)
    assert len(deploys) == 2 and client.exists("cs-sig-v1")


def test_a_tenant_at_its_share_evicts_only_its_own(setup, new_lru) -> None:
    """Share 2 of 4: the hostile tenant cycles through six versions; the other tenant's function stays,
    even with free slots left the hostile one never holds more than two."""
    _provider, client, tpl, functions = setup
    lru = new_lru()
    budget = FunctionBudget(client, budget=BUDGET, tenant_share=2, lru=lru, cache_s=0)
    use(budget, client, tpl, functions, "victim", 10)
    for version in (1, 2, 3, 4, 5, 6, 1):
        use(budget, client, tpl, functions, "hostile", version)
        assert len(lru.held("hostile")) <= 2
        assert fn(10) in budget.deployed()
        assert len(budget.deployed()) <= 3  # the victim's one and the hostile share
    assert lru.held("hostile") == [fn(6), fn(1)]
    assert lru.held("victim") == [fn(10)]


def test_a_share_full_of_pins_is_a_clear_429_and_changes_nothing(setup, new_lru) -> None:
    _provider, client, tpl, functions = setup
    lru = new_lru()
    pins = {"hostile": {fn(1), fn(2)}}
    budget = FunctionBudget(client, budget=BUDGET, tenant_share=2, lru=lru, pinned=lambda: pins, cache_s=0)
    use(budget, client, tpl, functions, "hostile", 1)
    with pytest.raises(TenantShareFull) as err:  # fn(2) is not deployed yet but its pin is charged
        use(budget, client, tpl, functions, "hostile", 3)
    assert http_status(err.value) == 429 and err.value.retry_after_s > 0
    assert err.value.code == "tenant_function_share_full"
    assert err.value.details == {"tenant_function_share": 2, "pinned": 2, "function": fn(3)}
    assert lru.held("hostile") == [fn(1)] and fn(3) not in budget.deployed()
    use(budget, client, tpl, functions, "hostile", 2)  # its pinned versions always fit
    use(budget, client, tpl, functions, "other", 3)  # and another tenant is not affected
    assert sorted(budget.deployed()) == [fn(1), fn(2), fn(3)]
    # pins from before the share was lowered keep working (subscribe admits no new ones), and hold
    # nothing beyond them
    pins["hostile"] = {fn(1), fn(2), fn(4)}
    use(budget, client, tpl, functions, "hostile", 4)
    assert lru.held("hostile") == [fn(1), fn(2), fn(4)]
    with pytest.raises(TenantShareFull):
        use(budget, client, tpl, functions, "hostile", 5)


def test_a_shared_function_is_charged_to_each_tenant_and_kept_while_one_holds_it(setup, new_lru) -> None:
    """A marketplace version's one function, used by two tenants: it counts in both shares, and when
    one of them makes room it drops only that tenant's hold; the function stays for the other."""
    _provider, client, tpl, functions = setup
    lru = new_lru()
    budget = FunctionBudget(client, budget=BUDGET, tenant_share=2, lru=lru, cache_s=0)
    use(budget, client, tpl, functions, "buyer-a", 1)
    use(budget, client, tpl, functions, "buyer-b", 1)
    use(budget, client, tpl, functions, "buyer-a", 2)
    use(budget, client, tpl, functions, "buyer-a", 3)  # a's LRU is the shared one: a lets go of it
    assert lru.held("buyer-a") == [fn(2), fn(3)]
    assert lru.held("buyer-b") == [fn(1)]
    assert fn(1) in budget.deployed()
    use(budget, client, tpl, functions, "buyer-b", 4)
    use(budget, client, tpl, functions, "buyer-b", 2)  # b at its share: 1, its LRU, goes for good
    assert fn(1) not in budget.deployed()
    assert sorted(budget.deployed()) == [fn(2), fn(3), fn(4)]


def test_share_and_budget_hold_under_concurrent_replicas(setup, new_lru, redis_client) -> None:
    """Three registry replicas and a scheduler (long cache) grant from threads at once, on one Redis:
    the hostile tenant never holds more than its share, the slots never exceed the budget, and the
    gateway never has more than the budget deployed (the provider's hard cap would refuse a deploy)."""
    _provider, client, tpl, functions = setup
    share = 2
    replicas = [FunctionBudget(client, budget=BUDGET, tenant_share=share, lru=new_lru(), cache_s=0,
                               touch_every_s=0) for _ in range(3)]
    replicas.append(FunctionBudget(client, budget=BUDGET, tenant_share=share, lru=new_lru(), cache_s=60))
    lru = replicas[0].lru
    use(replicas[0], client, tpl, functions, "victim", 20)
    errors: list[BaseException] = []
    seen: list[tuple[int, int]] = []

    def work(replica: FunctionBudget, versions: list[int]) -> None:
        try:
            for version in versions:  # deploy only: its own calls evict each other (its own churn)
                replica.ensure_deployed("hostile", "sig", version, deployer(client, tpl, functions, version))
                seen.append((len(lru.held("hostile")), len(lru.slots())))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r, [(i + k) % 7 + 1 for k in range(6)]))
               for i, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert seen and max(h for h, _ in seen) <= share and max(s for _, s in seen) <= BUDGET
    assert len(lru.held("hostile")) <= share
    assert fn(20) in replicas[0].deployed() and len(replicas[0].deployed()) <= BUDGET


def test_grants_are_atomic_without_the_lock(new_lru) -> None:
    """The Redis grant alone (no lease lock, no gateway) keeps both caps when many callers race."""
    lru = new_lru()
    errors: list[BaseException] = []
    refused: list[str] = []

    def grab(worker: int) -> None:
        try:
            for i in range(30):
                tenant = "hostile" if worker % 3 else f"tenant-{worker}"
                try:
                    lru.acquire(tenant, f"cs-f{(worker * 7 + i) % 12}-v1", share=3, budget=BUDGET + 2,
                                pinned_by_tenant=(), pinned=())
                except BudgetExhausted:
                    refused.append(tenant)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=grab, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not refused  # nothing pinned: there is always an idle slot to take
    assert len(lru.held("hostile")) <= 3
    assert len(lru.slots()) <= BUDGET + 2
    holders = {n: {t for t in ("hostile", "tenant-0", "tenant-3", "tenant-6") if n in lru.held(t)}
               for n in lru.slots()}
    assert all(holders.values())  # every slot belongs to someone; nothing leaked
