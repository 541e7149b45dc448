"""Build contexts and deployment bodies for per-version script functions.

`render_context` lays a version out in `functions/<fn-name>/` exactly as `faas-cli build --shrinkwrap`
would (docs/openfaas.md §3.2, §4.1): the template folder is copied to the root, the version's
"handler folder" (`script.py` + `meta.json`) is overlaid into `function/`, and every
`configuration.copy` path (the `customscripts` package, as in stack.yml) lands in
`function/<path>`. The result is a plain Docker build context any builder can use, and the folder
the local provider runs. Rendering is atomic (temp folder, then rename, under a per-name file lock)
and idempotent: an unchanged context hash leaves the folder alone.

`deployment()` is the matching `FunctionDeployment` body, and `stack_deployments()` turns stack.yml
into bodies the same way `faas-cli deploy` does, for the platform functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from customscripts.config import REPO_ROOT, settings
from customscripts.faas.naming import SERVICE_PORT_ANNOTATION, function_name, label_value

TEMPLATE_DIR = REPO_ROOT / "templates" / "script"
FUNCTIONS_DIR = REPO_ROOT / "functions"
# Mirrors `configuration.copy` in stack.yml: the shared package travels inside every build context.
COPY_PATHS = ("customscripts",)
DEFAULT_FPROCESS = "python index.py"
INVOCATION_SECRET = "invocation-secret"
LABEL = "com.customscripts"
TENANT_ANNOTATION = f"{LABEL}.tenant"  # the tenant a script function belongs to (its owner's)
BUILD_STAMP = ".build.json"
_SKIP = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "build", "template"}


class TemplateMissing(RuntimeError):
    """templates/script/ is absent or incomplete, so no script function can be built."""


@dataclass(frozen=True)
class BuildResult:
    name: str
    path: Path
    code_sha256: str
    context_sha256: str
    rebuilt: bool


def code_sha256(code: bytes | str) -> str:
    return hashlib.sha256(code.encode() if isinstance(code, str) else code).hexdigest()


def _files(root: Path) -> Iterator[Path]:
    """Every file under root, in a stable order, skipping caches (what faas-cli would copy, minus junk)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP and not d.startswith(".git"))
        for filename in sorted(filenames):
            if not filename.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / filename


def check_template(template_dir: Path) -> None:
    missing = [rel for rel in ("index.py", "function/handler.py") if not (template_dir / rel).is_file()]
    if missing:
        raise TemplateMissing(
            f"script template {template_dir} is missing {', '.join(missing)}: every script version is "
            "built from templates/script/ (python3-http layout: Dockerfile, index.py, template.yml, "
            "function/handler.py)"
        )


def template_fprocess(template_dir: Path) -> str:
    """`fprocess` from the template's template.yml, which faas-cli deploy sends as envProcess."""
    import yaml

    try:
        data = yaml.safe_load((template_dir / "template.yml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return DEFAULT_FPROCESS
    value = data.get("fprocess") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_FPROCESS


def _meta_bytes(meta: Mapping[str, Any] | Any) -> bytes:
    if hasattr(meta, "model_dump"):
        meta = meta.model_dump(mode="json")
    return (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode()


def _plan(template_dir: Path, code: bytes, meta: bytes, copy: tuple[str, ...],
          copy_root: Path) -> dict[str, Path | bytes]:
    """Relative path in the context -> source file or literal bytes, in overlay order."""
    plan: dict[str, Path | bytes] = {}
    for path in _files(template_dir):
        plan[path.relative_to(template_dir).as_posix()] = path
    plan.setdefault("function/requirements.txt", b"")
    plan["function/script.py"] = code
    plan["function/meta.json"] = meta
    for rel in copy:
        src = (copy_root / rel).resolve()
        if copy_root.resolve() not in src.parents:
            raise ValueError(f"copy path {rel!r} is outside {copy_root}")  # faas-cli pathInScope
        if src.is_file():
            plan[f"function/{rel}"] = src
        else:
            for path in _files(src):
                plan[f"function/{rel}/{path.relative_to(src).as_posix()}"] = path
    return plan


def _plan_hash(plan: Mapping[str, Path | bytes]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(plan):
        item = plan[rel]
        data = item if isinstance(item, bytes) else item.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


@contextlib.contextmanager
def _name_lock(functions_dir: Path, name: str) -> Iterator[None]:
    functions_dir.mkdir(parents=True, exist_ok=True)
    with open(functions_dir / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def render_context(script_id: str, version: int, code: bytes | str, meta: Mapping[str, Any] | Any, *,
                   template_dir: Path | None = None, functions_dir: Path | None = None,
                   copy: tuple[str, ...] = COPY_PATHS, copy_root: Path = REPO_ROOT) -> BuildResult:
    """Render `functions/<fn>/` for one version; a no-op when the context hash is unchanged."""
    template_dir = template_dir or TEMPLATE_DIR
    functions_dir = functions_dir or FUNCTIONS_DIR
    check_template(template_dir)
    name = function_name(script_id, version)
    code_bytes = code.encode() if isinstance(code, str) else code
    plan = _plan(template_dir, code_bytes, _meta_bytes(meta), copy, copy_root)
    context_hash = _plan_hash(plan)
    code_hash = code_sha256(code_bytes)
    target = functions_dir / name
    stamp = {"function": name, "script_id": script_id, "version": version, "code_sha256": code_hash,
             "context_sha256": context_hash}
    with _name_lock(functions_dir, name):
        with contextlib.suppress(OSError, ValueError):
            if json.loads((target / BUILD_STAMP).read_text()).get("context_sha256") == context_hash:
                return BuildResult(name, target, code_hash, context_hash, rebuilt=False)
        tmp = functions_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for rel, item in plan.items():
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(item, bytes):
                    dest.write_bytes(item)
                else:
                    shutil.copy2(item, dest)
            (tmp / BUILD_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            old = None
            if target.exists():
                old = functions_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(name, target, code_hash, context_hash, rebuilt=True)


def remove_context(script_id: str, version: int, functions_dir: Path | None = None) -> None:
    functions_dir = functions_dir or FUNCTIONS_DIR
    name = function_name(script_id, version)
    with _name_lock(functions_dir, name):
        shutil.rmtree(functions_dir / name, ignore_errors=True)


def image_ref(name: str, code_hash: str, image_prefix: str | None = None) -> str:
    prefix = (image_prefix if image_prefix is not None else settings().image_prefix).rstrip("/")
    return f"{prefix}/{name}:{code_hash[:12]}"


def deployment(script_id: str, version: int, *, owner_id: str, tenant: str, code_hash: str, tier: str,
               context_hash: str | None = None, template_dir: Path | None = None,
               gateway_url: str | None = None, isolation: str | None = None,
               image_prefix: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `FunctionDeployment` body (and stack entry) of one script version."""
    cfg = settings()
    tier_cfg = cfg.tier(tier)
    if tier_cfg is None:
        raise ValueError(f"unknown tier {tier!r}")
    name = function_name(script_id, version)
    timeout_s = max(1, math.ceil(tier_cfg.timeout_ms / 1000))
    annotations = {
        f"{LABEL}.code-sha256": code_hash,
        TENANT_ANNOTATION: tenant,
        f"{LABEL}.owner-id": owner_id,
        f"{LABEL}.tier": tier,
    }
    if context_hash:
        annotations[f"{LABEL}.context-sha256"] = context_hash
    return {
        "service": name,
        "image": image_ref(name, code_hash, image_prefix),
        "namespace": "",
        "envProcess": template_fprocess(template_dir or TEMPLATE_DIR),
        "envVars": {
            "CS_GATEWAY_URL": gateway_url or cfg.data_gateway_url,
            "CS_ISOLATION": isolation or cfg.isolation_mode,
            "CS_SCRIPT_ID": script_id,
            "CS_SCRIPT_VERSION": str(version),
            "CS_TIER": tier,
            "prefix_logs": "false",  # of-watchdog: keep our JSON log lines intact
            "exec_timeout": f"{timeout_s + 30}s",  # batches run several evaluations per call
            **(env or {}),
        },
        "secrets": [INVOCATION_SECRET],
        "labels": {
            f"{LABEL}.kind": "script",
            f"{LABEL}.owner": label_value(owner_id),
            f"{LABEL}.script": label_value(script_id),
            f"{LABEL}.version": str(version),
            f"{LABEL}.code-hash": code_hash[:12],
            "com.openfaas.scale.min": "1",
            "com.openfaas.scale.max": "5",
        },
        "annotations": annotations,
        "limits": {"memory": tier_cfg.function_memory, "cpu": tier_cfg.function_cpu},
        "requests": {"memory": tier_cfg.function_memory, "cpu": tier_cfg.function_cpu},
        "readOnlyRootFilesystem": True,
    }


# --------------------------------------------------------------------------- stack.yml

_ENVSUBST = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def envsubst(text: str, environ: Mapping[str, str] | None = None) -> str:
    """faas-cli's default envsubst: `${VAR}` and `${VAR:-default}`."""
    env = os.environ if environ is None else environ
    return _ENVSUBST.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def load_stack(path: Path | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    import yaml

    path = path or REPO_ROOT / "stack.yml"
    return yaml.safe_load(envsubst(path.read_text(), environ))


def stack_deployments(path: Path | None = None, *, local: bool = True,
                      environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """FunctionDeployment bodies for stack.yml's functions, as `faas-cli deploy` builds them.

    With `local=True` each body also names its handler folder (annotation
    `com.customscripts.local.path`) so the local provider can run it without an image, and
    gateway-fn gets its local Service port (`com.customscripts.local.service-port`): script
    functions call it there, as they call its Service on Kubernetes.
    """
    path = path or REPO_ROOT / "stack.yml"
    stack = load_stack(path, environ)
    service_ports = {"gateway-fn": settings().gateway_fn_port}
    bodies = []
    for name, fn in (stack.get("functions") or {}).items():
        annotations = dict(fn.get("annotations") or {})
        if local:
            annotations["com.customscripts.local.path"] = str((path.parent / fn["handler"]).resolve())
            if name in service_ports:
                annotations[SERVICE_PORT_ANNOTATION] = str(service_ports[name])
        lang = fn.get("lang", "")
        template = path.parent / "templates" / lang
        fprocess = fn.get("fprocess") or (template_fprocess(template) if template.is_dir() else DEFAULT_FPROCESS)
        body: dict[str, Any] = {
            "service": name,
            "image": fn["image"],
            "namespace": fn.get("namespace", ""),
            "envProcess": fprocess,
            "envVars": {k: str(v) for k, v in (fn.get("environment") or {}).items()},
            "secrets": list(fn.get("secrets") or []),
            "labels": {k: str(v) for k, v in (fn.get("labels") or {}).items()},
            "annotations": {k: str(v) for k, v in annotations.items()},
            "readOnlyRootFilesystem": bool(fn.get("readonly_root_filesystem", False)),
        }
        for key in ("limits", "requests"):
            if fn.get(key):
                body[key] = {k: str(v) for k, v in fn[key].items()}
        if fn.get("constraints"):
            body["constraints"] = list(fn["constraints"])
        bodies.append(body)
    return bodies
