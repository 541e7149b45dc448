"""Publish builds the version's image (customscripts/faas/buildqueue.py), on the real stack.

The states queued -> building -> built | failed live on the version's catalog row; the tests drive them
with a builder that does not touch podman (the real builds are tests/integration/test_images_podman.py)
and check what callers see over HTTP through the local provider: 503 `building` with Retry-After and no
function deployed until the image exists, 409 `build_failed` after, the build on the version's GET (the
log to the owner only) and in the audit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import psycopg
import pytest

from customscripts.auth import Principal
from customscripts.faas import buildqueue
from customscripts.faas.builder import BuildFailed, BuildOutcome
from customscripts.faas.client import OpenFaaSClient
from customscripts.faas.naming import function_name
from customscripts.registry.models import DraftCreate
from customscripts.registry.service import RegistryService
from tests.integration.registry_support import Caller, error_code
from tests.waiting import wait_until

AS_OF = 1357084800.0  # 2013-01-02, inside the sample data


class FakeBuilder:
    """Answers as a builder would, from a list of outcomes (an exception is a failed attempt)."""

    name = "fake"

    def __init__(self, *outcomes: Exception | None) -> None:
        self.outcomes = list(outcomes)
        self.contexts: list[Path] = []

    def build(self, context: Path, image: str, *, progress=None) -> BuildOutcome:
        self.contexts.append(context)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, Exception):
            raise outcome
        return BuildOutcome(image, f"built {image}", 0.01)


@pytest.fixture
def alice(api, uid) -> Caller:
    return Caller(api, f"alice-{uid}", f"tenant-{uid}")


@pytest.fixture
def registry(stack) -> RegistryService:
    return RegistryService(dataclasses.replace(stack, builder="podman", build_attempts=2))


def _set_status(cfg, script_id: str, version: int, status: str) -> None:
    with psycopg.connect(cfg.pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE script_versions SET build_status = %s, build_queued_at = now() WHERE script_id = %s"
                     " AND version = %s", (status, script_id, version))


def _audit(cfg, script_id: str) -> list[tuple[str, str]]:
    with psycopg.connect(cfg.pg_dsn) as conn:
        return [tuple(r) for r in conn.execute("SELECT status, user_id FROM audit WHERE script_id = %s AND"
                                               " action = 'build' ORDER BY id", (script_id,))]


def _execute(caller: Caller, script_id: str):
    return caller.call("POST", f"/scripts/{script_id}/execute",
                       {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": AS_OF})


def _deployed(cfg) -> set[str]:
    with OpenFaaSClient(cfg.provider_url, cfg.openfaas_user, cfg.openfaas_password) as client:
        return {f["name"] for f in client.list()}


def _drain(registry: RegistryService, builder: FakeBuilder, script_id: str, version: int) -> None:
    """Work the queue until this version's build ends (other tests' queued builds may come first)."""
    worker = buildqueue.BuildWorker(registry.builds, builder, buildqueue.version_context(registry))
    for _ in range(50):
        state = registry.builds.state(script_id, version)
        if state is not None and state.status in (buildqueue.BUILT, buildqueue.FAILED):
            return
        if worker.run_once() is None:
            return


@pytest.mark.parametrize("status", ["queued", "building"])
def test_execute_answers_503_building_and_deploys_nothing_until_the_image_exists(stack, alice, registry,
                                                                                 status) -> None:
    sid = alice.sid("unbuilt")
    alice.create_published("unbuilt")
    _set_status(stack, sid, 1, status)  # what publish leaves when a builder is configured
    for _ in range(3):  # every attempt, not just the first
        resp = _execute(alice, sid)
        assert resp.status_code == 503, resp.text
        assert error_code(resp) == "building"
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.json()["error"]["details"]["build"]["status"] == status
    assert function_name(sid, 1) not in _deployed(stack)  # no function started from an image that is not there
    _drain(registry, FakeBuilder(), sid, 1)
    assert registry.builds.state(sid, 1).status == "built"
    resp = _execute(alice, sid)
    assert resp.status_code == 200 and resp.json()["status"] == "ok", resp.text


def test_failed_build_is_retried_then_shows_on_the_version_and_in_the_audit(stack, api, uid, alice,
                                                                            registry) -> None:
    bob = Caller(api, f"bob-{uid}", alice.tenant)
    sid = alice.sid("broken")
    alice.create_published("broken", permissions={"allowed_users": [bob.user_id]})
    _set_status(stack, sid, 1, "queued")
    failure = BuildFailed("podman build failed (exit 1)", "STEP 8/15: RUN pip install\nERROR: no wheel for numpy")
    builder = FakeBuilder(failure, failure)
    _drain(registry, builder, sid, 1)
    assert len(builder.contexts) == 2  # CS_BUILD_ATTEMPTS=2: one retry, then failed
    state = registry.builds.state(sid, 1)
    assert state.status == "failed" and state.attempts == 2 and "no wheel for numpy" in state.log
    assert _audit(stack, sid) == [("retrying", alice.user_id), ("failed", alice.user_id)]

    resp = _execute(alice, sid)
    assert resp.status_code == 409 and error_code(resp) == "build_failed", resp.text
    assert function_name(sid, 1) not in _deployed(stack)
    owner_view = alice.call("GET", f"/scripts/{sid}/versions/1").json()
    assert owner_view["build"]["status"] == "failed" and "no wheel for numpy" in owner_view["build"]["log"]
    user_view = bob.call("GET", f"/scripts/{sid}/versions/1")
    assert user_view.status_code == 200, user_view.text
    assert user_view.json()["build"]["status"] == "failed" and "log" not in user_view.json()["build"]

    assert registry.builds.retry(sid, 1) is True  # an operator queues it again
    assert registry.builds.retry(sid, 1) is False  # only a failed build can be retried
    _drain(registry, FakeBuilder(), sid, 1)
    assert registry.builds.state(sid, 1).status == "built"
    assert _execute(alice, sid).status_code == 200


def test_publish_queues_the_build_and_the_worker_builds_it(stack, alice, registry, monkeypatch) -> None:
    builder = FakeBuilder()
    monkeypatch.setattr(buildqueue, "builder_for", lambda cfg=None: builder)
    buildqueue._workers.clear()
    principal = Principal(alice.user_id, alice.tenant, "pro")
    meta = registry.create_draft(principal, DraftCreate(script_id="queued", name="queued",
                                                        source="def run(ctx):\n    return 2.0\n"))
    published, unchanged = registry.publish(principal, meta.script_id)
    assert not unchanged
    assert wait_until(lambda: registry.builds.state(meta.script_id, 1).status == "built", timeout=30)
    state = registry.builds.state(meta.script_id, 1)
    assert state.image == f"{stack.image_prefix}/{function_name(meta.script_id, 1)}:{published.code_sha256[:12]}"
    assert (builder.contexts[0] / "function" / "script.py").read_text() == "def run(ctx):\n    return 2.0\n"
    assert _audit(stack, meta.script_id) == [("built", alice.user_id)]


def test_no_builder_queues_nothing_and_execute_runs_as_before(stack, alice) -> None:
    sid = alice.sid("plain")
    alice.create_published("plain")  # the stack's registry-fn runs with CS_BUILDER=none
    assert RegistryService(stack).builds.state(sid, 1) is None
    assert _execute(alice, sid).status_code == 200


def test_a_build_whose_worker_died_is_claimed_again(stack, alice, registry) -> None:
    sid = alice.sid("orphan")
    alice.create_published("orphan")
    _set_status(stack, sid, 1, "queued")
    claimed = None
    for _ in range(50):  # other tests' queued builds may come first: leave them to their own tests
        claimed = registry.builds.claim()
        if claimed is None or claimed.script_id == sid:
            break
        _set_status(stack, claimed.script_id, claimed.version, "queued")
    assert claimed is not None and claimed.script_id == sid and claimed.attempts == 1
    assert registry.builds.state(sid, 1).status == "building"
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:  # the worker died; its lease ran out
        conn.execute("UPDATE script_versions SET build_lease_until = now() - interval '1 second'"
                     " WHERE script_id = %s AND version = 1", (sid,))
    _drain(registry, FakeBuilder(), sid, 1)
    state = registry.builds.state(sid, 1)
    assert state.status == "built" and state.attempts == 2
