"""Attacks on the local provider's `/system` API (deploy, delete, list, describe: the keys to every function).

Each stack gets its own random basic-auth password at `customscripts up`, kept in
`.state/secrets/basic-auth-password` (0600) across down/up; nothing else opens `/system`: not the
fixed password the provider used to accept, not an empty or absent one, not a near miss.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from customscripts.local import stack as localstack
from customscripts.local.provider import Provider

OLD_FIXED_PASSWORD = "local-admin-password"

# every /system route and method the provider knows, plus ones it does not: none may answer without auth
SYSTEM_ROUTES = [
    ("GET", "/system/functions", None),
    ("POST", "/system/functions", b"{}"),
    ("PUT", "/system/functions", b"{}"),
    ("DELETE", "/system/functions", json.dumps({"functionName": "cs-not-there-v1"}).encode()),
    ("PATCH", "/system/functions", b"{}"),
    ("GET", "/system/function/registry-fn", None),
    ("GET", "/system/function/registry-fn.openfaas-fn", None),
    ("GET", "/system/info", None),
    ("HEAD", "/system/info", None),
    ("GET", "/system/namespaces", None),
    ("GET", "/system/secrets", None),
    ("GET", "/system/", None),
]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def forged_headers(real: str) -> list[str | None]:
    """Authorization headers an attacker would try; `real` is the stack's password."""
    return [
        None,
        basic("admin", OLD_FIXED_PASSWORD),
        basic("admin", ""),
        basic("", ""),
        basic("", real),
        basic("root", real),
        basic("admin", real + "x"),
        basic("admin", real[:-1]),
        basic("admin", real + "\n"),
        basic("admin", real + "\x00"),
        basic("admin", ""),
        "Basic ",
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"admin").decode(),
        "Bearer " + real,
        real,
        basic("admin", real).replace("Basic", "Digest"),
    ]


def assert_every_route_refuses(base: str, real: str) -> None:
    for method, path, body in SYSTEM_ROUTES:
        for header in forged_headers(real):
            headers = {"Authorization": header} if header is not None else {}
            resp = requests.request(method, base + path, data=body, headers=headers, timeout=10)
            assert resp.status_code == 401, (method, path, header, resp.status_code, resp.text[:200])
            assert resp.headers.get("WWW-Authenticate", "").startswith("Basic")


def password_file(cfg) -> Path:
    return cfg.state_dir / "secrets" / "basic-auth-password"


def test_stack_provider_refuses_every_forged_key(stack):
    """The old fixed password, an empty or absent one, near misses: 401 on every /system route."""
    real = stack.openfaas_password
    assert_every_route_refuses(stack.provider_url, real)
    assert requests.get(stack.provider_url + "/system/functions", auth=(stack.openfaas_user, real),
                        timeout=10).status_code == 200


def test_stack_password_is_random_and_private(stack):
    path = password_file(stack)
    assert path.is_file(), "customscripts up did not generate the provider's password"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid()
    real = path.read_text().strip()
    assert len(real) >= 32 and real != OLD_FIXED_PASSWORD
    assert stack.openfaas_password == real  # what the CLI, tests and scheduler use
    assert requests.get(stack.provider_url + "/system/info", auth=("admin", real), timeout=10).status_code == 200


def test_stack_secrets_are_made_once_and_checked(tmp_path):
    """First up makes the file; later ups keep it (and put a loosened mode back); a planted symlink or
    foreign file is refused, never written through."""
    import dataclasses

    from customscripts.config import settings

    cfg = dataclasses.replace(settings(), state_dir=tmp_path / "state")
    localstack.ensure_stack_secrets(cfg)
    path = password_file(cfg)
    first = path.read_text()
    path.chmod(0o644)
    localstack.ensure_stack_secrets(cfg)
    assert path.read_text() == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    other = dataclasses.replace(cfg, state_dir=tmp_path / "other")
    localstack.ensure_stack_secrets(other)
    assert password_file(other).read_text() != first  # one per stack
    target = tmp_path / "target"
    target.write_text("")
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(SystemExit):
        localstack.ensure_stack_secrets(cfg)
    assert target.read_text() == ""


def test_password_is_kept_across_down_and_up(stack):
    before = password_file(stack).read_text()
    localstack.down(stack, only={"provider"})
    localstack.up(stack, only={"provider"})
    assert password_file(stack).read_text() == before
    assert requests.get(stack.provider_url + "/system/info", auth=("admin", before.strip()),
                        timeout=10).status_code == 200
    assert requests.get(stack.provider_url + "/system/info", auth=("admin", OLD_FIXED_PASSWORD),
                        timeout=10).status_code == 401
    # registry-fn still deploys script functions with it (the secret it is given, as on OpenFaaS)
    from tests.integration.registry_support import Caller
    from tests.integration.test_execute_e2e import execute

    caller = Caller(stack.registry_url, "pw-user", "pw-tenant")
    sid = "pw-" + os.urandom(5).hex()
    caller.create_published(sid, "def run(ctx):\n    return 3.0\n")
    assert execute(caller, sid).json()["output"]["value"] == 3.0


@pytest.mark.parametrize("configured", ["", None])
def test_a_provider_without_a_password_opens_nothing(tmp_path, monkeypatch, configured):
    """No password configured (empty, or no secret anywhere): every /system call is 401, even `admin:`."""
    monkeypatch.delenv("CS_OPENFAAS_PASSWORD", raising=False)
    monkeypatch.setenv("CS_STATE_DIR", str(tmp_path / "empty-state"))
    from customscripts.config import settings

    settings.cache_clear()
    try:
        provider = Provider("127.0.0.1", 0, state_dir=tmp_path / "state", functions_dir=tmp_path / "fns",
                            password=configured, secrets={}).start()
        try:
            assert_every_route_refuses(provider.url, "")
            assert_every_route_refuses(provider.url, OLD_FIXED_PASSWORD)
        finally:
            provider.stop()
    finally:
        settings.cache_clear()


def read_password(env: dict[str, str]) -> str:
    code = "from customscripts.config import settings; print(settings().openfaas_password, end='')"
    clean = {k: v for k, v in os.environ.items() if k not in ("CS_OPENFAAS_PASSWORD", "CS_SECRETS_DIR")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout


def test_password_sources(tmp_path):
    """Production: the OpenFaaS secret file. Locally: the stack's state file. A function the provider
    runs gets only the secrets it lists (its own secrets folder), never the stack's state file."""
    state = tmp_path / "state"
    (state / "secrets").mkdir(parents=True)
    (state / "secrets" / "basic-auth-password").write_text("from-the-stack\n")
    openfaas = tmp_path / "var-openfaas-secrets"
    openfaas.mkdir()
    (openfaas / "basic-auth-password").write_text("from-openfaas\n")
    empty = tmp_path / "no-secrets"
    empty.mkdir()
    assert read_password({"CS_STATE_DIR": str(state), "CS_SECRETS_DIR": str(openfaas)}) == "from-openfaas"
    assert read_password({"CS_STATE_DIR": str(state)}) == "from-the-stack"
    assert read_password({"CS_STATE_DIR": str(state), "CS_SECRETS_DIR": str(empty)}) == ""
    assert read_password({"CS_STATE_DIR": str(tmp_path / "nothing")}) == ""


def test_production_wiring_takes_the_openfaas_secret():
    """On OpenFaaS the password is the basic-auth-password secret, mounted where config.secret() looks
    first, for registry-fn (stack.yml) and the scheduler (deploy/k8s/base/platform/scheduler.yaml)."""
    import yaml

    from customscripts.config import OPENFAAS_SECRETS_DIR, REPO_ROOT
    from customscripts.faas.build import stack_deployments

    assert str(OPENFAAS_SECRETS_DIR) == "/var/openfaas/secrets"
    registry = next(b for b in stack_deployments(local=False) if b["service"] == "registry-fn")
    assert "basic-auth-password" in registry["secrets"]
    assert "CS_OPENFAAS_PASSWORD" not in registry["envVars"]
    manifests = yaml.safe_load_all((REPO_ROOT / "deploy/k8s/base/platform/scheduler.yaml").read_text())
    scheduler = next(d for d in manifests if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert any(m["mountPath"] == str(OPENFAAS_SECRETS_DIR) for m in scheduler["containers"][0]["volumeMounts"])
    sources = scheduler["volumes"][0]["projected"]["sources"]
    assert {"secret": {"name": "basic-auth-password"}} in sources
