"""Attacks on the function budget over the real path (registry-fn behind the local provider).

Live subscriptions pin their versions' functions and every execute holds one, while the platform
deploys at most `CS_FUNCTION_BUDGET` script functions. One tenant tries to take every slot —
subscribing to as many versions as the budget holds, through its own scripts, several users, a
dependency chain or other tenants' marketplace scripts, or by cycling executes through more versions
than the budget — and another tenant must still execute and subscribe. The hostile tenant gets a
clear error naming its share (`tenant_function_share_full`), never another tenant's slot.
"""

from __future__ import annotations

import pytest

from customscripts.faas.build import stack_deployments
from customscripts.faas.client import OpenFaaSClient
from customscripts.faas.naming import function_name
from tests.integration.realtime_support import drop_subscriptions
from tests.integration.registry_support import LISTS, Caller, error_code
from tests.integration.test_execute_e2e import execute
from tests.integration.test_realtime import subscribe

SHARE_FULL = "tenant_function_share_full"


def registry_budget() -> int:
    """The function budget registry-fn runs with (stack.yml's CS_FUNCTION_BUDGET)."""
    body = next(b for b in stack_deployments() if b["service"] == "registry-fn")
    return int(body["envVars"]["CS_FUNCTION_BUDGET"])


@pytest.fixture
def tenants(stack):
    """Tenants whose subscriptions are dropped afterwards, so no pin outlives its test."""
    made: list[str] = []
    yield made
    for tenant in made:
        drop_subscriptions(stack, tenant)


@pytest.fixture
def gateway(stack):
    with OpenFaaSClient(stack.provider_url, stack.openfaas_user, stack.openfaas_password) as client:
        yield client


def deployed(client: OpenFaaSClient) -> set[str]:
    return {f["name"] for f in client.list() if (f.get("labels") or {}).get("com.customscripts.kind") == "script"}


def callers(api: str, uid: str, tenants: list[str], name: str, users: int = 1,
            features: tuple[str, ...] = ()) -> list[Caller]:
    tenant = f"{name}-tenant-{uid}"
    tenants.append(tenant)
    return [Caller(api, f"{name}{i}-{uid}", tenant, features=features) for i in range(users)]


def assert_share_full(resp, status: int) -> None:
    assert resp.status_code == status, resp.text
    assert error_code(resp) == SHARE_FULL
    details = resp.json()["error"].get("details") or {}
    assert details.get("tenant_function_share", 0) >= 1, details
    if status == 429:
        assert int(resp.headers["Retry-After"]) > 0


def assert_other_tenant_unaffected(api: str, uid: str, tenants: list[str]) -> None:
    (victim,) = callers(api, uid, tenants, "victim")
    sid = f"victim-{uid}"
    victim.create_published(sid, "def run(ctx):\n    return 7.0\n")
    resp = execute(victim, sid)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "ok" and resp.json()["output"]["value"] == 7.0
    resp = subscribe(victim, sid)
    assert resp.status_code == 201, resp.text


def test_one_tenant_cannot_pin_every_function_slot(api, uid, tenants):
    """Two users of one tenant subscribe to (and execute) as many versions as the budget holds."""
    budget = registry_budget()
    users = callers(api, uid, tenants, "hostile", users=2)
    accepted, refused = 0, None
    for i in range(budget):
        user = users[i % 2]
        sid = f"pin{i}-{uid}"
        user.create_published(sid, f"def run(ctx):\n    return {i}.0\n")
        resp = subscribe(user, sid)
        if resp.status_code != 201:
            refused = resp
            break
        accepted += 1
        assert execute(user, sid).json()["status"] == "ok"  # deployed, held and pinned
    assert refused is not None, f"one tenant pinned all {budget} function slots"
    assert_share_full(refused, 409)
    assert 1 <= accepted < budget
    # its whole share is pinned: a new version gets a clear 429, not another tenant's slot
    users[0].create_published(f"extra-{uid}")
    assert_share_full(execute(users[0], f"extra-{uid}"), 429)
    # what it already pinned keeps working
    assert execute(users[1], f"pin1-{uid}").json()["status"] == "ok"
    assert_other_tenant_unaffected(api, uid, tenants)


def test_dependency_closure_is_charged_to_the_subscriber(api, uid, tenants):
    """Subscribing to the top of a chain pins every link: a chain longer than the share is refused."""
    budget = registry_budget()
    (hostile,) = callers(api, uid, tenants, "chain")
    previous = None
    for i in range(budget):
        sid = f"link{i}-{uid}"
        source = (f"def run(ctx):\n    return get_script_output('{previous}')['value'] + 1\n" if previous
                  else "def run(ctx):\n    return 1.0\n")
        hostile.create_published(sid, source, depends_on=[f"{previous}@1"] if previous else [])
        previous = sid
    assert_share_full(subscribe(hostile, previous), 409)
    assert_other_tenant_unaffected(api, uid, tenants)


def test_marketplace_versions_are_charged_to_each_subscribing_tenant(api, uid, tenants):
    """A vendor lists as many scripts as the budget holds; a buyer tenant cannot pin them all, and
    the functions it pins are charged to the buyer, not to the vendor or to other buyers."""
    budget = registry_budget()
    (vendor,) = callers(api, uid, tenants, "vendor", features=LISTS)
    (hostile,) = callers(api, uid, tenants, "buyer")
    (other,) = callers(api, uid, tenants, "otherbuyer")
    listed = [vendor.sid(f"listed{i}-{uid}") for i in range(budget)]
    for i, sid in enumerate(listed):
        vendor.create_published(sid, f"def run(ctx):\n    return {i}.0\n", permissions={"marketplace": True})
    accepted, refused = [], None
    for sid in listed:
        assert hostile.call("POST", f"/scripts/{sid}/marketplace/subscribe").status_code == 201
        resp = subscribe(hostile, sid)
        if resp.status_code != 201:
            refused = resp
            break
        accepted.append(sid)
    assert refused is not None, f"one tenant pinned all {budget} marketplace functions"
    assert_share_full(refused, 409)
    # the vendor's own share is untouched by its buyers
    assert subscribe(vendor, listed[-1]).status_code == 201
    # another buyer pins the same (shared) functions against its own share
    assert other.call("POST", f"/scripts/{accepted[0]}/marketplace/subscribe").status_code == 201
    assert subscribe(other, accepted[0]).status_code == 201
    assert_other_tenant_unaffected(api, uid, tenants)


def test_executes_over_more_versions_than_the_budget_evict_only_the_tenants_own(api, uid, tenants, gateway):
    """Without subscribing, a tenant cycles executes through more versions than the budget holds:
    each one works (its own least recently used function makes room), it never holds more than its
    share, and another tenant's function stays deployed."""
    budget = registry_budget()
    (victim,) = callers(api, uid, tenants, "resident")
    resident = victim.sid(f"resident-{uid}")
    victim.create_published(resident)
    assert execute(victim, resident).json()["status"] == "ok"
    (hostile,) = callers(api, uid, tenants, "churn")
    mine = [hostile.sid(f"churn{i}-{uid}") for i in range(budget + 1)]
    most = 0
    for i, sid in enumerate(mine):
        hostile.create_published(sid, f"def run(ctx):\n    return {i}.0\n")
        resp = execute(hostile, sid)
        assert resp.status_code == 200 and resp.json()["output"]["value"] == float(i), resp.text
        names = deployed(gateway)
        most = max(most, len(names & {function_name(s, 1) for s in mine}))
        assert function_name(resident, 1) in names, f"execute {i} of another tenant evicted its function"
    assert most < budget
    assert execute(victim, resident).json()["status"] == "ok"


def test_concurrent_subscribes_and_executes_cannot_race_past_the_share(api, uid, tenants, gateway):
    """The share is checked where it is recorded (PostgreSQL lock for pins, one Redis script for
    holds), so firing many subscribes, then many executes, at once gains nothing."""
    from concurrent.futures import ThreadPoolExecutor

    budget = registry_budget()
    users = callers(api, uid, tenants, "racer", users=4)
    sids = [f"race{i}-{uid}" for i in range(budget)]
    for i, sid in enumerate(sids):
        users[i % 4].create_published(sid, f"def run(ctx):\n    return {i}.0\n")
    with ThreadPoolExecutor(8) as pool:
        subscribed = list(pool.map(lambda i: subscribe(users[i % 4], sids[i]), range(budget)))
    accepted = [r for r in subscribed if r.status_code == 201]
    for resp in subscribed:
        assert resp.status_code in (201, 409, 429), resp.text
        if resp.status_code == 409:
            assert error_code(resp) == SHARE_FULL
    assert 1 <= len(accepted) < budget
    share = len(accepted)
    with ThreadPoolExecutor(8) as pool:
        executed = list(pool.map(lambda i: execute(users[i % 4], sids[i]), range(budget)))
    for resp in executed:  # what it pinned runs; the rest finds its share full (or waits its turn)
        assert resp.status_code in (200, 429, 503), resp.text
    assert sum(r.status_code == 200 for r in executed) >= 1
    mine = deployed(gateway) & {function_name(s, 1) for s in sids}
    assert len(mine) <= share, mine
    assert_other_tenant_unaffected(api, uid, tenants)
