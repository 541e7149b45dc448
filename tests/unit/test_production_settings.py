"""Production refuses the local stack's secrets (customscripts.config.check_production); locally they still work.

In-process for every secret setting and every way it can be wrong, and as processes for the services' real
entry points (registry-fn, gateway-fn, a script function, the scheduler): each stops at start, naming the
setting, before it serves or connects to anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from customscripts.config import (
    REPO_ROOT,
    SECRET_SETTINGS,
    ProductionSettingsError,
    Settings,
    check_production,
    production,
)

GOOD = {env: f"production-{env.lower()}-7f3a9c1e5b" for _, env in SECRET_SETTINGS.values()}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A clean slate: no CS_ENV, not in a pod, no secret in the environment, an empty secrets folder."""
    for name in ("CS_ENV", "KUBERNETES_SERVICE_HOST", *GOOD):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CS_SECRETS_DIR", str(tmp_path))  # a function's folder: the stack's own is not read
    yield monkeypatch


def _production(env: pytest.MonkeyPatch, **values: str) -> Settings:
    env.setenv("CS_ENV", "production")
    for name, value in {**GOOD, **values}.items():
        env.setenv(name, value)
    return check_production(Settings())


def _local_default(field: str) -> str:
    return getattr(Settings(), field)


def _refusal(field: str, default: str) -> str:
    """How check_production names a local default: an empty one (the gateway password has none) is 'empty'."""
    return f"{field} is empty" if default == "" else f"{field} is the local stack's default"


def test_local_stack_keeps_its_defaults(env: pytest.MonkeyPatch) -> None:
    assert not production()
    cfg = Settings()
    assert cfg.jwt_secret == "local-jwt-secret-change-me-in-production"
    assert cfg.pg_password == "customscripts-local"
    assert "password=customscripts-local" in cfg.pg_dsn


def test_how_production_is_detected(env: pytest.MonkeyPatch) -> None:
    env.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # the kubelet sets it in every container
    assert production()
    env.setenv("CS_ENV", "local")  # a local stack inside a pod says so
    assert not production()
    env.delenv("KUBERNETES_SERVICE_HOST")
    env.setenv("CS_ENV", "production")
    assert production()
    env.setenv("CS_ENV", "prod")
    with pytest.raises(ProductionSettingsError, match="CS_ENV"):
        production()


def test_production_with_every_secret_configured_starts(env: pytest.MonkeyPatch) -> None:
    cfg = _production(env)
    for field, (_, env_name) in SECRET_SETTINGS.items():
        assert getattr(cfg, field) == GOOD[env_name]
    cfg.require(*SECRET_SETTINGS)


@pytest.mark.parametrize("field", sorted(SECRET_SETTINGS))
def test_a_local_default_in_the_environment_refuses_to_start(env: pytest.MonkeyPatch, field: str) -> None:
    _, env_name = SECRET_SETTINGS[field]
    default = _local_default(field)
    with pytest.raises(ProductionSettingsError, match=rf"{_refusal(field, default)} \(from {env_name}\)"):
        _production(env, **{env_name: default})


@pytest.mark.parametrize("field", sorted(SECRET_SETTINGS))
def test_a_local_default_in_a_secret_file_refuses_to_start(env: pytest.MonkeyPatch, tmp_path: Path,
                                                           field: str) -> None:
    file_name, _ = SECRET_SETTINGS[field]
    default = _local_default(field)
    (tmp_path / file_name).write_text(default + "\n")  # as `kubectl create secret --from-file` leaves it
    with pytest.raises(ProductionSettingsError, match=rf"{_refusal(field, default)} \(from .*{file_name}\)"):
        _production(env)


@pytest.mark.parametrize("field", sorted(SECRET_SETTINGS))
def test_an_empty_secret_refuses_to_start(env: pytest.MonkeyPatch, tmp_path: Path, field: str) -> None:
    file_name, env_name = SECRET_SETTINGS[field]
    with pytest.raises(ProductionSettingsError, match=rf"{field} is empty"):
        _production(env, **{env_name: ""})
    env.setenv(env_name, GOOD[env_name])
    (tmp_path / file_name).write_text("  \n")
    with pytest.raises(ProductionSettingsError, match=rf"{field} is empty"):
        _production(env)


def test_all_wrong_secrets_are_named_at_once(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProductionSettingsError) as caught:
        _production(env, CS_JWT_SECRET=_local_default("jwt_secret"), CS_PG_PASSWORD="")
    assert "jwt_secret" in str(caught.value) and "pg_password" in str(caught.value)


@pytest.mark.parametrize("field", sorted(SECRET_SETTINGS))
def test_an_unset_secret_is_never_the_default(env: pytest.MonkeyPatch, field: str) -> None:
    """A process not given a secret (a script function holds only the invocation secret) starts, and any use
    of the missing one raises naming it instead of quietly using the local default."""
    file_name, env_name = SECRET_SETTINGS[field]
    env.setenv("CS_ENV", "production")
    for name, value in GOOD.items():
        if name != env_name:
            env.setenv(name, value)
    cfg = check_production(Settings())
    if isinstance(getattr(Settings, field, None), property):  # read when asked; it has no default at all
        assert getattr(cfg, field) == ""
    else:
        with pytest.raises(ProductionSettingsError, match=rf"{field} is not configured .*{file_name} or {env_name}"):
            getattr(cfg, field)
    with pytest.raises(ProductionSettingsError, match=field):
        cfg.require(*SECRET_SETTINGS)
    cfg.require(*(name for name in SECRET_SETTINGS if name != field))
    if field == "pg_password":
        with pytest.raises(ProductionSettingsError):
            _ = cfg.pg_dsn
    with pytest.raises(AttributeError):
        _ = cfg.no_such_setting


def test_the_secret_file_wins_over_the_environment(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "pg-password").write_text("from-the-mounted-secret-91b2\n")
    cfg = _production(env)
    assert cfg.pg_password == "from-the-mounted-secret-91b2"


# --------------------------------------------------------------------------- the services' real entry points

_ENTRY_POINTS = {
    "registry-fn": ["-c", "import sys; sys.path.insert(0, 'registry-fn'); import handler"],
    "gateway-fn": ["-c", "import sys; sys.path.insert(0, 'gateway-fn'); import handler"],
    "script function": ["-c", "from pathlib import Path; from customscripts.faas.runner import load_handler; "
                              "load_handler(Path('templates/script'))"],
    "scheduler": ["-m", "scheduler.main"],
}


def _run(argv: list[str], secrets_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CS_") and k != "KUBERNETES_SERVICE_HOST"}
    # endpoints nobody listens on: a process that got past its start check would hang or fail differently
    base.update({"CS_SECRETS_DIR": str(secrets_dir), "CS_PG_PORT": "9", "CS_REDIS_PORT": "9", "CS_NATS_PORT": "9",
                 "CS_S3_ENDPOINT": "127.0.0.1:9", "PYTHONPATH": str(REPO_ROOT), **env})
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=base, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("service", sorted(_ENTRY_POINTS))
def test_each_service_refuses_to_start_with_a_default_secret(tmp_path: Path, service: str) -> None:
    for file_name, env_name in SECRET_SETTINGS.values():
        (tmp_path / file_name).write_text(GOOD[env_name])
    (tmp_path / "invocation-secret").write_text("local-invocation-secret-change-me-in-production")
    done = _run(_ENTRY_POINTS[service], tmp_path, KUBERNETES_SERVICE_HOST="10.96.0.1")  # any pod
    assert done.returncode != 0
    assert "ProductionSettingsError" in done.stderr
    assert "invocation_secret is the local stack's default" in done.stderr


def test_the_scheduler_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    (tmp_path / "invocation-secret").write_text(GOOD["CS_INVOCATION_SECRET"])
    done = _run(["-m", "scheduler.main"], tmp_path, CS_ENV="production")
    assert done.returncode != 0
    assert "pg_password is not configured" in done.stderr and "execution_token_secret" in done.stderr
