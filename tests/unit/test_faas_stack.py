"""stack.yml is valid OpenFaaS YAML (docs/openfaas.md §3.1) and its handler folders exist."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from customscripts.config import REPO_ROOT, settings
from customscripts.faas import build
from customscripts.faas.naming import SERVICE_PORT_ANNOTATION
from customscripts.local.deployments import validate_deployment

SCHEMA = json.loads((Path(__file__).parent / "stack_schema.json").read_text())
STACK = REPO_ROOT / "stack.yml"


def load(text: str) -> dict:
    return yaml.safe_load(text)


def test_stack_matches_schema_raw_and_substituted() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    raw = STACK.read_text()
    jsonschema.validate(load(raw), SCHEMA)
    jsonschema.validate(load(build.envsubst(raw, {})), SCHEMA)


def test_stack_content() -> None:
    stack = build.load_stack(STACK, {})
    assert stack["provider"]["name"] == "openfaas"
    assert stack["provider"]["gateway"] == "http://127.0.0.1:8080"
    assert set(stack["functions"]) == {"registry-fn", "gateway-fn"}
    assert stack["configuration"]["copy"] == ["./customscripts", "./templates"]
    # the platform's own python3-http, vendored: never the upstream template pulled from the store
    assert stack["configuration"]["templates"] == [{"name": "python3-http", "source": "./templates/python3-http"}]
    for name, fn in stack["functions"].items():
        assert fn["lang"] == "python3-http"
        assert fn["handler"] == f"./{name}"
        assert fn["readonly_root_filesystem"] is True
        assert fn["limits"]["memory"].endswith("Mi")
        assert fn["labels"]["com.customscripts.kind"] == "platform"
        assert ":" in fn["image"].rsplit("/", 1)[-1]


def test_handler_folders_and_copy_paths_exist() -> None:
    stack = build.load_stack(STACK, {})
    for fn in stack["functions"].values():
        assert (REPO_ROOT / fn["handler"]).is_dir(), fn["handler"]
    for path in stack["configuration"]["copy"]:
        assert (REPO_ROOT / path).is_dir(), path


def test_handler_files_present() -> None:
    stack = build.load_stack(STACK, {})
    missing = [fn["handler"] for fn in stack["functions"].values()
               if not (REPO_ROOT / fn["handler"] / "handler.py").is_file()]
    if missing:
        pytest.skip(f"handler.py not written yet in {missing}")


@pytest.mark.parametrize("mutate", [
    lambda s: s["provider"].update(name="aws"),
    lambda s: s.update(extra=1),
    lambda s: s["functions"].update({"Bad_Name": s["functions"]["registry-fn"]}),
    lambda s: s["functions"].update({"x" * 64: s["functions"]["registry-fn"]}),
    lambda s: s["functions"]["gateway-fn"].update(unknown_field=True),
    lambda s: s["functions"]["gateway-fn"].update(secrets="jwt-secret"),
    lambda s: s["functions"]["gateway-fn"]["labels"].update(x="y" * 64),
    lambda s: s["configuration"].update(copy=["../outside"]),
    lambda s: s.update(version="2.0"),
])
def test_schema_rejects_invalid(mutate) -> None:
    stack = load(STACK.read_text())
    mutate(stack)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(stack, SCHEMA)


def test_stack_deployments_are_valid_bodies(tmp_path: Path) -> None:
    bodies = build.stack_deployments(STACK, environ={}, functions_dir=tmp_path)
    assert [b["service"] for b in bodies] == ["registry-fn", "gateway-fn"]
    for body in bodies:
        validate_deployment(body)
        assert body["readOnlyRootFilesystem"] is True
        assert body["envProcess"] == "python index.py"
        assert (tmp_path / body["service"] / "function" / "handler.py").is_file()  # its build context


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.mark.parametrize("name", ["registry-fn", "gateway-fn"])
def test_platform_context_is_the_shrinkwrap_layout(name: str, tmp_path: Path) -> None:
    """What `faas-cli build --shrinkwrap` makes of stack.yml (docs/openfaas.md §3.2): the `lang`
    template at the root, the handler folder overlaid into function/, each `configuration.copy` path
    at function/<path>; nothing else (but the build stamp), and less the local-only subpackage, which
    the template's .dockerignore keeps out of a plain faas-cli build's image as well."""
    stack = load(STACK.read_text())
    fn = stack["functions"][name]
    built = build.render_stack_function(name, stack_path=STACK, functions_dir=tmp_path)
    expected = _tree(REPO_ROOT / "templates" / fn["lang"])
    expected.update({f"function/{k}": v for k, v in _tree(REPO_ROOT / fn["handler"]).items()})
    for rel in stack["configuration"]["copy"]:
        rel = rel.removeprefix("./")
        expected.update({f"function/{rel}/{k}": v for k, v in _tree(REPO_ROOT / rel).items()})
    local_only = [k for k in expected if k.startswith("function/customscripts/local/")]
    assert local_only and ".dockerignore" in expected
    assert "function/customscripts/local" in expected[".dockerignore"].decode().split("\n")
    for key in local_only:
        del expected[key]
    got = _tree(built.path)
    assert got.pop(build.BUILD_STAMP)
    assert got.keys() == expected.keys()
    assert got == expected
    assert built.path == tmp_path / name and not build.render_stack_function(
        name, stack_path=STACK, functions_dir=tmp_path).rebuilt


def test_script_functions_reach_gateway_fn_by_its_service_address() -> None:
    """Locally gateway-fn is also served on its Service port, and that is the URL registry-fn bakes
    into script functions (stack.yml's default), never the gateway's /function/ route, which the
    NetworkPolicy does not let script functions reach."""
    cfg = settings()
    bodies = {b["service"]: b for b in build.stack_deployments(STACK, environ={})}
    port = bodies["gateway-fn"]["annotations"][SERVICE_PORT_ANNOTATION]
    assert int(port) == cfg.gateway_fn_port
    assert SERVICE_PORT_ANNOTATION not in bodies["registry-fn"]["annotations"]
    # empty locally: registry-fn (like every process of the stack) derives it from CS_GATEWAY_FN_PORT,
    # so two stacks on one machine never share a gateway-fn
    assert bodies["registry-fn"]["envVars"]["CS_GATEWAY_URL"] == ""
    assert bodies["registry-fn"]["envVars"]["OPENFAAS_URL"] == ""
    assert cfg.data_gateway_url == f"http://{cfg.provider_host}:{port}"
    assert "/function/" not in cfg.data_gateway_url
    assert SERVICE_PORT_ANNOTATION not in build.stack_deployments(STACK, local=False, environ={})[1]["annotations"]
