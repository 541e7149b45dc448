"""Real images: registry-fn, gateway-fn and a script version built with podman from their shrinkwrapped
contexts (offline base image, wheelhouse, no network during the build, nothing pulled), then each run the
way functions run (read-only root, tmpfs /tmp, non-root, no capabilities, --network none) far enough to
answer HTTP on its own port. Skipped only where no container engine can run here, with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from customscripts.faas import images
from customscripts.faas.builder import PodmanBuilder, image_for_context
from tests.integration import image_support

SOURCE = "def run(ctx):\n    return {'value': 1.0}\n"


@pytest.fixture(scope="module")
def engine() -> images.Engine:
    status = images.probe()
    if not status.usable:
        print(f"no container engine can run here: {status.reason}")
        pytest.skip(f"no container engine can run here: {status.reason}")
    assert status.engine is not None
    return status.engine


class RecordingBuilder(PodmanBuilder):
    """Remembers the images it tagged, removed after the module (their layers stay in the cache)."""

    made: list[str]

    def build(self, context, image, **kwargs):
        self.made.append(image)
        return super().build(context, image, **kwargs)


@pytest.fixture(scope="module")
def builder(engine: images.Engine):
    recording = RecordingBuilder(engine)
    recording.made = []
    yield recording
    if recording.made:
        subprocess.run(engine.command("rmi", "--force", *recording.made), capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


def _meta(script_id: str) -> dict:
    return {"script_id": script_id, "version": 1, "owner_id": "alice", "tenant": "acme", "name": "one",
            "runtime_mode": "onetime", "status": "published", "tier": "pro", "code_sha256": "0" * 64,
            "permissions": {}, "input_schema": {}, "output_schema": {}, "depends_on": []}


def _inspect(engine: images.Engine, image: str) -> dict:
    done = subprocess.run(engine.command("image", "inspect", image), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]


def _check_image(engine: images.Engine, image: str) -> None:
    config = _inspect(engine, image)["Config"]
    assert config.get("User") == "10001:10001"  # numeric: runAsNonRoot can verify it
    env = dict(e.split("=", 1) for e in config.get("Env", []))
    assert env["CS_ISOLATION"] == "process" and env["PYTHONDONTWRITEBYTECODE"] == "1"


# registry-fn: its OpenAPI document (no storage needed); gateway-fn: a read without a token (401, before
# any database is asked: the container has no network)
@pytest.mark.parametrize("name, method, path, expected", [("registry-fn", "GET", "/openapi.json", 200),
                                                          ("gateway-fn", "GET", "/data/market", 401)])
def test_platform_function_image_builds_and_serves(engine, builder, workdir, name, method, path, expected) -> None:
    context = image_support.platform_context(name, workdir)
    image = f"localhost/cs-test/{name}:{image_for_context(context).rsplit(':', 1)[1]}"
    outcome = builder.build(context, image)
    assert outcome.image == image and engine.image_exists(image)
    _check_image(engine, image)
    with image_support.running(engine, image) as container:
        status, body = image_support.ask(engine, container, method, path)
        assert status == expected, f"{name} did not serve: {status} {body}\n{image_support.logs_of(engine, container)}"
        assert image_support.whoami(engine, container) == "10001"


def test_script_version_image_builds_serves_and_reuses_layers(engine, builder, workdir) -> None:
    context = image_support.script_context("one-abc123abc123", 1, SOURCE, _meta("one-abc123abc123"), workdir)
    image = image_for_context(context)
    assert image.split("/")[-1].startswith("cs-one-abc123abc123-v1:")
    first = builder.build(context, image)
    _check_image(engine, image)
    with image_support.running(engine, image) as container:
        status, body = image_support.ask(engine, container, "POST", "/")
        # no invocation token: refused by the handler, which answers only after its sandbox started
        assert status == 401, f"script function did not serve: {status} {body}\n" \
                              f"{image_support.logs_of(engine, container)}"
    # a second version of the script: the dependency layers come from the cache
    second_ctx = image_support.script_context("one-abc123abc123", 2, SOURCE + "# v2\n",
                                              {**_meta("one-abc123abc123"), "version": 2}, workdir)
    second = builder.build(second_ctx, image_for_context(second_ctx))
    assert "Using cache" in second.log or "--> Using cache" in second.log, second.log[-2000:]
    assert first.image != second.image


def test_the_build_never_reaches_a_registry(engine, builder, workdir) -> None:
    """The Dockerfile names of-watchdog in a stage local builds skip: a build with --pull=never and no
    network succeeds, so nothing was fetched (the integration builds above do the same)."""
    context = image_support.platform_context("gateway-fn", workdir / "again")
    outcome = builder.build(context, "localhost/cs-test/gateway-fn:offline")
    assert "ghcr.io" not in outcome.log and "Trying to pull" not in outcome.log


def test_customscripts_build_builds_a_published_version(engine, api, uid, tmp_path) -> None:
    """`customscripts build --script ID@N`: the version's image through the build queue's states, progress
    lines for people on stderr, `--json` for programs."""
    from customscripts.faas import build
    from tests.integration.registry_support import Caller

    probe = build.render_context("probe-0123456789ab", 1, SOURCE, _meta("probe-0123456789ab"),
                                 functions_dir=tmp_path)
    if not (probe.path / "Dockerfile").is_file():
        pytest.skip("this checkout's renderer still lays out the old script template (no Dockerfile at its root)")
    alice = Caller(api, f"alice-{uid}", f"tenant-{uid}")
    sid = alice.sid("cli")
    alice.create_published("cli")
    argv = [sys.executable, "-m", "customscripts.cli", "build", "--no-platform", "--script", f"{sid}@1"]
    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(done.stdout)
    assert result["status"] == "built" and engine.image_exists(result["image"])
    again = subprocess.run(argv, capture_output=True, text=True, timeout=900)  # cached now
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[build] building " in again.stderr and f"{sid}@1: built {result['image']}" in again.stdout
    subprocess.run(engine.command("rmi", "--force", result["image"]), capture_output=True, timeout=300)
