"""Build contexts match the `faas-cli build --shrinkwrap` layout; deployment bodies are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from customscripts.config import settings
from customscripts.faas import build
from customscripts.faas.naming import is_dns1123
from customscripts.local.deployments import validate_deployment

CODE = "def run(ctx):\n    return 1\n"
META = {"script_id": "rsi", "version": 2, "owner_id": "u1", "runtime_mode": "onetime"}


@pytest.fixture
def template(tmp_path: Path) -> Path:
    """A folder shaped as templates/: the python3-http language template and the script handler folder."""
    root = tmp_path / "templates"
    lang = root / "python3-http"
    (lang / "function").mkdir(parents=True)
    (lang / "Dockerfile").write_text("FROM python:3.12-alpine\n")
    (lang / "index.py").write_text("from function import handler\n")
    (lang / "requirements.txt").write_text("")
    (lang / "template.yml").write_text("language: python3-http\nfprocess: python index.py --script\n")
    (lang / "function" / "handler.py").write_text("def handle(event, context):\n    return 'placeholder'\n")
    script = root / "script"
    (script / "__pycache__").mkdir(parents=True)
    (script / "handler.py").write_text("def handle(event, context):\n    return None\n")
    (script / "requirements.txt").write_text("numpy\n")
    (script / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"junk")
    return root


@pytest.fixture
def copy_root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "sub" / "mod.py").write_text("X = 1\n")
    return root


def render(template: Path, functions: Path, copy_root: Path, code: str = CODE) -> build.BuildResult:
    return build.render_context("rsi", 2, code, META, templates_dir=template, functions_dir=functions,
                                copy=("pkg",), copy_root=copy_root)


def test_layout_matches_shrinkwrap(template: Path, tmp_path: Path, copy_root: Path) -> None:
    result = render(template, tmp_path / "functions", copy_root)
    assert result.name == "cs-rsi-v2" and result.rebuilt
    files = {p.relative_to(result.path).as_posix() for p in result.path.rglob("*") if p.is_file()}
    assert files == {
        "Dockerfile", "index.py", "requirements.txt", "template.yml", build.BUILD_STAMP,
        "function/handler.py", "function/requirements.txt", "function/script.py", "function/meta.json",
        "function/pkg/__init__.py", "function/pkg/sub/mod.py",
    }
    assert (result.path / "function" / "script.py").read_text() == CODE
    # the handler folder overlays the language template's placeholder, as faas-cli overlays it
    assert (result.path / "function" / "handler.py").read_text() == (template / "script" / "handler.py").read_text()
    assert (result.path / "function" / "requirements.txt").read_text() == "numpy\n"
    assert json.loads((result.path / "function" / "meta.json").read_text()) == META
    stamp = json.loads((result.path / build.BUILD_STAMP).read_text())
    assert stamp["code_sha256"] == build.code_sha256(CODE) == result.code_sha256


def test_idempotent_and_atomic(template: Path, tmp_path: Path, copy_root: Path) -> None:
    functions = tmp_path / "functions"
    first = render(template, functions, copy_root)
    mtime = (first.path / "function" / "script.py").stat().st_mtime_ns
    again = render(template, functions, copy_root)
    assert not again.rebuilt and again.context_sha256 == first.context_sha256
    assert (first.path / "function" / "script.py").stat().st_mtime_ns == mtime
    (template / "script" / "handler.py").write_text("def handle(event, context):\n    return 2\n")
    changed = render(template, functions, copy_root)
    assert changed.rebuilt and changed.context_sha256 != first.context_sha256
    assert changed.code_sha256 == first.code_sha256
    # no temp or old folders are left behind
    assert sorted(p.name for p in functions.iterdir() if not p.name.endswith(".lock")) == ["cs-rsi-v2"]


def test_missing_template_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(build.TemplateMissing, match="templates/script"):
        build.render_context("rsi", 1, CODE, META, templates_dir=tmp_path / "nope",
                             functions_dir=tmp_path / "functions")
    assert not (tmp_path / "functions" / "cs-rsi-v1").exists()


def test_copy_outside_root_rejected(template: Path, tmp_path: Path, copy_root: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        build.render_context("rsi", 2, CODE, META, templates_dir=template, functions_dir=tmp_path / "f",
                             copy=("../etc",), copy_root=copy_root)


def test_deployment_body(template: Path) -> None:
    sha = build.code_sha256(CODE)
    body = build.deployment("rsi", 2, owner_id="alice@example.com", tenant="acme", code_hash=sha, tier="pro",
                            templates_dir=template, gateway_url="http://gw/function/gateway-fn",
                            isolation="process", context_hash="c" * 64)
    tier = settings().tier("pro")
    assert body["service"] == "cs-rsi-v2" and is_dns1123(body["service"])
    assert body["image"] == f"{settings().image_prefix}/cs-rsi-v2:{sha[:12]}"
    assert body["envProcess"] == "python index.py --script"
    assert body["limits"] == {"memory": tier.function_memory, "cpu": tier.function_cpu}
    assert body["readOnlyRootFilesystem"] is True
    assert body["secrets"] == ["invocation-secret"]
    assert body["envVars"]["CS_GATEWAY_URL"] == "http://gw/function/gateway-fn"
    assert body["envVars"]["CS_ISOLATION"] == "process"
    labels = body["labels"]
    assert labels["com.customscripts.script"] == "rsi"
    assert labels["com.customscripts.version"] == "2"
    assert labels["com.customscripts.code-hash"] == sha[:12]
    assert labels["com.customscripts.kind"] == "script"
    assert all(len(v) <= 63 for v in labels.values())
    assert body["annotations"]["com.customscripts.code-sha256"] == sha
    assert body["annotations"]["com.customscripts.tenant"] == "acme"
    assert body["annotations"]["com.customscripts.owner-id"] == "alice@example.com"
    # the body is exactly what the provider (and faas-netes) accept
    assert validate_deployment(json.loads(json.dumps(body)))["service"] == "cs-rsi-v2"


def test_deployment_unknown_tier(template: Path) -> None:
    with pytest.raises(ValueError, match="tier"):
        build.deployment("rsi", 2, owner_id="u", tenant="t", code_hash="0" * 64, tier="nope",
                         templates_dir=template)


def test_envsubst() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert build.envsubst("${A} ${B:-two} ${EMPTY:-dflt} ${C}", env) == "1 two dflt "
