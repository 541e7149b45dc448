"""Build contexts and deployment bodies for every function: script versions and the platform's own.

A build context is laid out exactly as `faas-cli build --shrinkwrap` lays it out (docs/openfaas.md
§3.2, §4.1): the language template (`templates/python3-http/`) is copied to the root, the function's
handler folder is overlaid into `function/`, and every `configuration.copy` path (the `customscripts`
package, as in stack.yml) lands in `function/<path>`, less `customscripts/local/` (LOCAL_ONLY): the
local provider, stack and demo, which no image runs. For a script version the handler folder is
`templates/script/` plus the version's `script.py` and `meta.json` (`render_context`); for registry-fn
and gateway-fn it is the stack's handler folder (`render_stack_function`). Every context lands in
`functions/<fn-name>/` (CS_FUNCTIONS_DIR). The result is a plain Docker build context any builder can
use, and exactly the file tree the local provider runs, so a file or requirement missing from it fails
locally as it would in the image. Rendering is atomic (temp folder, then rename, under a per-name file
lock) and idempotent: an unchanged context hash leaves the folder alone.

`deployment()` is a script version's `FunctionDeployment` body, and `stack_deployments()` turns
stack.yml into bodies the same way `faas-cli deploy` does, for the platform functions.
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

import yaml

from customscripts.config import REPO_ROOT, settings
from customscripts.faas.naming import SERVICE_PORT_ANNOTATION, function_name, label_value

LANGUAGE = "python3-http"  # the one language template every function is built from
SCRIPT_HANDLER = "script"  # templates/script/: the handler folder of every script version
# Mirrors `configuration.copy` in stack.yml: the shared package travels inside every build context.
COPY_PATHS = ("customscripts",)
# Never in a build context, whatever the copy paths say: the local-only subpackage (the local provider,
# the local stack, the demo) that no image needs. templates/python3-http/.dockerignore says the same to a
# plain `faas-cli build`, whose shrinkwrap copies the whole package.
LOCAL_ONLY = ("customscripts/local",)
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


def check_template(templates_dir: Path, language: str = LANGUAGE, handler: str | None = SCRIPT_HANDLER) -> None:
    wanted = [f"{language}/index.py", f"{language}/template.yml"]
    if handler is not None:
        wanted.append(f"{handler}/handler.py")
    missing = [rel for rel in wanted if not (templates_dir / rel).is_file()]
    if missing:
        raise TemplateMissing(
            f"templates folder {templates_dir} is missing {', '.join(missing)}: every function is built from "
            f"templates/{LANGUAGE}/ (Dockerfile, index.py, template.yml), script versions with "
            f"templates/{SCRIPT_HANDLER}/ (handler.py, requirements.txt) as their handler folder"
        )


def template_fprocess(template_dir: Path) -> str:
    """`fprocess` from the template's template.yml, which faas-cli deploy sends as envProcess."""
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


def _plan(template_dir: Path, handler_dir: Path, extra: Mapping[str, bytes], copy: tuple[str, ...],
          copy_root: Path) -> dict[str, Path | bytes]:
    """Relative path in the context -> source file or literal bytes, in faas-cli's overlay order:
    the language template, the handler folder into function/ (its top-level `build` and `template`
    skipped), the function's own files, then each copy path into function/<path>."""
    plan: dict[str, Path | bytes] = {}
    for path in _files(template_dir):
        plan[path.relative_to(template_dir).as_posix()] = path
    for path in _files(handler_dir):
        plan[f"function/{path.relative_to(handler_dir).as_posix()}"] = path
    plan.setdefault("function/requirements.txt", b"")
    for rel, data in extra.items():
        plan[f"function/{rel}"] = data
    for rel in copy:
        src = (copy_root / rel).resolve()
        if copy_root.resolve() not in src.parents:
            raise ValueError(f"copy path {rel!r} is outside {copy_root}")  # faas-cli pathInScope
        if src.is_file():
            plan[f"function/{rel}"] = src
        else:
            for path in _files(src):
                plan[f"function/{rel}/{path.relative_to(src).as_posix()}"] = path
    return {dest: item for dest, item in plan.items() if not _local_only(dest)}


def _local_only(dest: str) -> bool:
    """Whether a context path is under LOCAL_ONLY (as the handler's copy: function/customscripts/local/...)."""
    rel = dest.removeprefix("function/")
    return any(rel == path or rel.startswith(path + "/") for path in LOCAL_ONLY)


def _plan_hash(plan: Mapping[str, Path | bytes]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(plan):
        item = plan[rel]
        data = item if isinstance(item, bytes) else item.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created with its folder) across the processes of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _name_lock(functions_dir: Path, name: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(functions_dir / f".{name}.lock")


def _write(functions_dir: Path, name: str, plan: Mapping[str, Path | bytes], stamp: dict[str, Any]) -> bool:
    """Lay `plan` out as functions_dir/name, atomically; False when the same context is already there."""
    target = functions_dir / name
    with _name_lock(functions_dir, name):
        with contextlib.suppress(OSError, ValueError):
            if json.loads((target / BUILD_STAMP).read_text()).get("context_sha256") == stamp["context_sha256"]:
                return False
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
    return True


def render_context(script_id: str, version: int, code: bytes | str, meta: Mapping[str, Any] | Any, *,
                   templates_dir: Path | None = None, functions_dir: Path | None = None,
                   copy: tuple[str, ...] = COPY_PATHS, copy_root: Path = REPO_ROOT) -> BuildResult:
    """Render `functions/<fn>/` for one script version; a no-op when the context hash is unchanged."""
    templates_dir = templates_dir or settings().templates_dir
    functions_dir = functions_dir or settings().functions_dir
    check_template(templates_dir)
    name = function_name(script_id, version)
    code_bytes = code.encode() if isinstance(code, str) else code
    plan = _plan(templates_dir / LANGUAGE, templates_dir / SCRIPT_HANDLER,
                 {"script.py": code_bytes, "meta.json": _meta_bytes(meta)}, copy, copy_root)
    context_hash = _plan_hash(plan)
    code_hash = code_sha256(code_bytes)
    stamp = {"function": name, "script_id": script_id, "version": version, "code_sha256": code_hash,
             "context_sha256": context_hash}
    rebuilt = _write(functions_dir, name, plan, stamp)
    return BuildResult(name, functions_dir / name, code_hash, context_hash, rebuilt=rebuilt)


def render_stack_function(name: str, *, stack_path: Path | None = None, templates_dir: Path | None = None,
                          functions_dir: Path | None = None,
                          environ: Mapping[str, str] | None = None) -> BuildResult:
    """Render `functions/<name>/` for one of stack.yml's functions (registry-fn, gateway-fn): its
    `lang` template, its `handler` folder and the stack's `configuration.copy`, as faas-cli would."""
    stack_path = stack_path or REPO_ROOT / "stack.yml"
    stack = load_stack(stack_path, environ)
    fn = (stack.get("functions") or {}).get(name)
    if not isinstance(fn, dict):
        raise KeyError(f"{name} is not a function of {stack_path}")
    templates_dir = templates_dir or settings().templates_dir
    functions_dir = functions_dir or settings().functions_dir
    language = str(fn.get("lang") or LANGUAGE)
    check_template(templates_dir, language, handler=None)
    copy = tuple(str(p).removeprefix("./") for p in (stack.get("configuration") or {}).get("copy") or ())
    plan = _plan(templates_dir / language, (stack_path.parent / fn["handler"]).resolve(), {}, copy,
                 stack_path.parent)
    context_hash = _plan_hash(plan)
    stamp = {"function": name, "code_sha256": context_hash, "context_sha256": context_hash}
    rebuilt = _write(functions_dir, name, plan, stamp)
    return BuildResult(name, functions_dir / name, context_hash, context_hash, rebuilt=rebuilt)


def read_stamp(context: Path) -> dict[str, Any]:
    """The build stamp a render left in the context ({} when there is none)."""
    try:
        data = json.loads((context / BUILD_STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def context_sha256(context: Path) -> str:
    """The context's content hash: the renderer's stamp when it wrote one, else over its files."""
    stamped = read_stamp(context).get("context_sha256")
    if isinstance(stamped, str) and stamped:
        return stamped
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(context).as_posix()
        if rel != BUILD_STAMP:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def remove_context(script_id: str, version: int, functions_dir: Path | None = None) -> None:
    functions_dir = functions_dir or settings().functions_dir
    name = function_name(script_id, version)
    with _name_lock(functions_dir, name):
        shutil.rmtree(functions_dir / name, ignore_errors=True)


def image_ref(name: str, code_hash: str, image_prefix: str | None = None) -> str:
    prefix = (image_prefix if image_prefix is not None else settings().image_prefix).rstrip("/")
    return f"{prefix}/{name}:{code_hash[:12]}"


def pod_metrics_env() -> dict[str, str]:
    """A function pod's ops listener (/metrics, /healthz, /readyz; faas/runner.py): every interface of the pod,
    CS_POD_METRICS_PORT. Never the gateway's port 8080, so nothing a caller sends through /function/<name>
    reaches it. The local provider gives each process a loopback port instead."""
    return {"CS_FN_METRICS_PORT": str(settings().pod_metrics_port), "CS_FN_METRICS_ADDR": "0.0.0.0"}


def pod_metrics_annotations() -> dict[str, str]:
    """How Prometheus finds a function pod's metrics (faas-netes copies a function's annotations to its pods)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(settings().pod_metrics_port),
            "prometheus.io/path": "/metrics"}


def deployment(script_id: str, version: int, *, owner_id: str, tenant: str, code_hash: str, tier: str,
               context_hash: str | None = None, templates_dir: Path | None = None,
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
        "envProcess": template_fprocess((templates_dir or settings().templates_dir) / LANGUAGE),
        "envVars": {
            "CS_GATEWAY_URL": gateway_url or cfg.data_gateway_url,
            "CS_ISOLATION": isolation or cfg.isolation_mode,
            "CS_SCRIPT_ID": script_id,
            "CS_SCRIPT_VERSION": str(version),
            "CS_TIER": tier,
            "prefix_logs": "false",  # of-watchdog: keep our JSON log lines intact
            "exec_timeout": f"{timeout_s + 30}s",  # batches run several evaluations per call
            **pod_metrics_env(),
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
        "annotations": {**annotations, **pod_metrics_annotations()},
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
    path = path or REPO_ROOT / "stack.yml"
    return yaml.safe_load(envsubst(path.read_text(), environ))


def stack_deployments(path: Path | None = None, *, local: bool = True, environ: Mapping[str, str] | None = None,
                      functions_dir: Path | None = None) -> list[dict[str, Any]]:
    """FunctionDeployment bodies for stack.yml's functions, as `faas-cli deploy` builds them.

    With `local=True` each function's build context is rendered into functions/<name>/ first (the
    local provider runs exactly that tree, as an image holds it), and gateway-fn gets its local Service
    port (`com.customscripts.local.service-port`): script functions call it there, as they call its
    Service on Kubernetes.
    """
    path = path or REPO_ROOT / "stack.yml"
    stack = load_stack(path, environ)
    service_ports = {"gateway-fn": settings().gateway_fn_port}
    bodies = []
    for name, fn in (stack.get("functions") or {}).items():
        annotations = dict(fn.get("annotations") or {})
        if local:
            render_stack_function(name, stack_path=path, environ=environ, functions_dir=functions_dir)
            if name in service_ports:
                annotations[SERVICE_PORT_ANNOTATION] = str(service_ports[name])
        lang = fn.get("lang", "")
        template = settings().templates_dir / lang
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
