"""Builders: a `faas-cli build --shrinkwrap` context folder in, an OCI image out.

One interface for every place images are made (docs/openfaas.md §13): `PodmanBuilder` on one machine
(the offline base image and the wheelhouse of faas/images.py, layers cached, nothing pulled, no network
during the build), `KubernetesJobBuilder` on a cluster (the context stored in the bucket as a tarball,
a Job made from the image-builder template running rootless BuildKit, pushing to CS_IMAGE_PREFIX;
deploy/k8s/README.md "Image builder contract"). The OpenFaaS Pro Function Builder takes the same
folder and would be a third.

Every build answers `BuildOutcome` (image ref, build log, seconds) or raises `BuildFailed` carrying the
log; `image_for_context()` names the image a context gets (`<CS_IMAGE_PREFIX>/<fn>:<code sha[:12]>` for a
script version, what `build.deployment()` deploys).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import ssl
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from customscripts.config import Settings, settings
from customscripts.faas import images
from customscripts.faas.build import context_sha256, image_ref, read_stamp

Progress = Callable[[str], None]
LOG_LIMIT = 64 * 1024  # the tail of a build log kept on the version


def _noop(_: str) -> None:
    pass


@dataclass(frozen=True)
class BuildOutcome:
    image: str
    log: str
    duration_s: float


class BuildFailed(RuntimeError):
    """The image could not be built; `log` is what the builder printed (its tail)."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log[-LOG_LIMIT:]


class Builder(Protocol):
    name: str

    def build(self, context: Path, image: str, *, progress: Progress = _noop) -> BuildOutcome:
        """Build `context` (a folder with its Dockerfile at the root) into `image`; BuildFailed otherwise."""
        ...


# --------------------------------------------------------------------------- naming


def image_for_context(context: Path, image_prefix: str | None = None) -> str:
    """The image a context is built into: a script version's `<prefix>/<fn>:<code sha[:12]>` (its
    stamp names both), any other context's `<prefix>/<folder name>:<context sha[:12]>`."""
    stamp = read_stamp(context)
    name, code = stamp.get("function"), stamp.get("code_sha256")
    if isinstance(name, str) and isinstance(code, str) and name and code:
        return image_ref(name, code, image_prefix)
    return image_ref(context.name, context_sha256(context), image_prefix)


# --------------------------------------------------------------------------- podman


class PodmanBuilder:
    """Local images with podman: `BASE_IMAGE` = the offline base, `WATCHDOG=none`, wheels from the
    wheelhouse mounted at /wheels, `--pull=never` and `--network none` so nothing is fetched, and
    podman's layer cache (dependencies are installed before code is copied, so a new version of a
    script rebuilds only its last layers)."""

    name = "podman"
    WHEELS_AT = "/wheels"

    def __init__(self, engine: images.Engine | None = None, cfg: Settings | None = None, *,
                 no_cache: bool = False) -> None:
        self.cfg = cfg or settings()
        self._engine = engine
        self.no_cache = no_cache  # every layer built again (the bench's first-build figure)

    @property
    def engine(self) -> images.Engine:
        if self._engine is None:
            self._engine = images.require_engine()
        return self._engine

    def build(self, context: Path, image: str, *, progress: Progress = _noop) -> BuildOutcome:
        started = time.monotonic()
        eng = self.engine
        if eng.name != "podman":
            raise BuildFailed(f"local builds need podman (found {eng.name}): they mount the wheelhouse at build")
        if not (context / "Dockerfile").is_file():
            raise BuildFailed(f"{context} has no Dockerfile: not a shrinkwrapped build context")
        try:
            base = images.ensure_base_image(eng, self.cfg, progress=progress)
            wheels = images.ensure_wheelhouse(images.requirements_of(context), self.cfg, engine=eng, image=base,
                                              progress=progress)
        except (images.EngineUnavailable, RuntimeError) as exc:
            raise BuildFailed(str(exc)) from None
        argv = eng.command("build", *eng.runtime_flags(), "--pull=never", "--network", "none",
                           "--no-cache" if self.no_cache else "--layers",
                           "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "WATCHDOG=none",
                           "--build-arg", f"WHEELHOUSE={self.WHEELS_AT}",
                           "--volume", f"{wheels}:{self.WHEELS_AT}:ro",
                           "--label", f"com.customscripts.context-sha256={context_sha256(context)}",
                           "--tag", image, "--file", str(context / "Dockerfile"), str(context))
        _fix_mtimes(context)
        progress(f"building {image} from {context}")
        done = images._run(argv, timeout=self.cfg.build_timeout_s, progress=lambda line: progress(f"  {line}"))
        seconds = time.monotonic() - started
        progress(f"{'built' if done.returncode == 0 else 'failed to build'} {image} in {seconds:.1f} s")
        if done.returncode != 0:
            raise BuildFailed(f"podman build of {image} failed (exit {done.returncode})", done.stdout)
        return BuildOutcome(image, done.stdout[-LOG_LIMIT:], seconds)


CONTEXT_MTIME = 1  # every file and folder of a context, before a build


def _fix_mtimes(context: Path) -> None:
    """One modification time for the whole context: buildah's COPY cache key covers file and folder times,
    and every version's context is written afresh, so without this the package copy (the same in every
    version) would miss the cache each time. Bytecode compiled at build records the same time."""
    for path in [context, *context.rglob("*")]:
        if not path.is_symlink():
            os.utime(path, (CONTEXT_MTIME, CONTEXT_MTIME))


# --------------------------------------------------------------------------- Kubernetes


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status


class KubeApi:
    """The few Kubernetes API calls the builder makes, over HTTPS with the pod's service account
    (CS_K8S_API to name another endpoint, e.g. `kubectl proxy` or a test server)."""

    def __init__(self, cfg: Settings | None = None, base_url: str | None = None, token: str | None = None) -> None:
        cfg = cfg or settings()
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base_url = (base_url or cfg.k8s_api or (f"https://{host}:{port}" if host else "")).rstrip("/")
        if not self.base_url:
            raise KubeError(0, "no Kubernetes API: set CS_K8S_API or run in a pod")
        if token is None and Path(cfg.k8s_token_file).is_file():
            token = Path(cfg.k8s_token_file).read_text().strip()
        self.token = token
        self.ssl = None
        if self.base_url.startswith("https://"):
            ca = cfg.k8s_ca_file if Path(cfg.k8s_ca_file).is_file() else None
            self.ssl = ssl.create_default_context(cafile=ca)

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ssl) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise KubeError(exc.code, detail) from None
        except (urllib.error.URLError, OSError) as exc:
            raise KubeError(0, str(exc)) from None
        return payload.decode(errors="replace") if raw else json.loads(payload or b"{}")


def _job_name(function: str, context_hash: str) -> str:
    """`build-<fn>-<context sha[:12]>`, at most 63 characters (a label value)."""
    stem = re.sub(r"[^a-z0-9-]", "-", function.lower())[:44].strip("-")
    return f"build-{stem}-{context_hash[:12]}"


def context_tarball(context: Path) -> bytes:
    """The context as a gzipped tar, Dockerfile at its root, deterministic (sorted, no times or owners)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in sorted(context.rglob("*")):
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            info = tar.gettarinfo(str(path), arcname=path.relative_to(context).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_file():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return buf.getvalue()


class KubernetesJobBuilder:
    """A Job per build, copied from the suspended CronJob template (rootless BuildKit), fed the context
    as a presigned URL of its tarball in the bucket, pushing `image`. Creating a Job that exists (same
    function and context: a retry, or a build another replica started) follows that Job instead."""

    name = "kubernetes"
    CONTEXT_ENV, IMAGE_ENV = "CS_BUILD_CONTEXT_URL", "CS_BUILD_IMAGE"

    def __init__(self, cfg: Settings | None = None, api: KubeApi | None = None, s3: Any = None,
                 poll_s: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg or settings()
        self._api = api
        self._s3 = s3
        self.poll_s = poll_s
        self.sleep = sleep

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            self._api = KubeApi(self.cfg)
        return self._api

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            from customscripts.registry.store import client

            self._s3 = client(self.cfg)
        return self._s3

    def upload_context(self, context: Path, function: str, context_hash: str) -> str:
        """Store the tarball at builds/<fn>/<context sha>.tar.gz; a presigned GET URL the Job can read
        for longer than it may run (the builder holds no bucket credentials)."""
        data = context_tarball(context)
        key = f"builds/{function}/{context_hash}.tar.gz"
        self.s3.put_object(self.cfg.s3_bucket, key, io.BytesIO(data), len(data), content_type="application/gzip")
        expires = timedelta(seconds=max(2 * self.cfg.build_timeout_s, 3600))
        return self.s3.presigned_get_object(self.cfg.s3_bucket, key, expires=expires)

    def job_body(self, job_name: str, function: str, image: str, context_url: str) -> dict[str, Any]:
        ns, template_name = self.cfg.build_namespace, self.cfg.build_job_template
        cronjob = self.api.request("GET", f"/apis/batch/v1/namespaces/{ns}/cronjobs/{template_name}")
        template = cronjob["spec"]["jobTemplate"]
        spec = json.loads(json.dumps(template["spec"]))
        for container in spec["template"]["spec"]["containers"]:
            env = [e for e in container.get("env", []) if e.get("name") not in (self.CONTEXT_ENV, self.IMAGE_ENV)]
            container["env"] = [*env, {"name": self.CONTEXT_ENV, "value": context_url},
                                {"name": self.IMAGE_ENV, "value": image}]
        labels = {**(template.get("metadata", {}).get("labels") or {}),
                  "com.customscripts.function": function[:63]}
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": job_name, "namespace": ns, "labels": labels,
                             "annotations": {"com.customscripts.image": image}},
                "spec": spec}

    def _log(self, job_name: str) -> str:
        ns = self.cfg.build_namespace
        selector = urllib.parse.quote(f"job-name={job_name}")
        try:
            pods = self.api.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector={selector}")
            parts = []
            for pod in sorted(pods.get("items", []), key=lambda p: p["metadata"].get("creationTimestamp", "")):
                name = pod["metadata"]["name"]
                parts.append(self.api.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}/log?tailLines=2000",
                                              raw=True))
            return "\n".join(parts)[-LOG_LIMIT:]
        except KubeError as exc:
            return f"(build log unavailable: {exc})"

    def build(self, context: Path, image: str, *, progress: Progress = _noop) -> BuildOutcome:
        started = time.monotonic()
        function = read_stamp(context).get("function") or context.name
        context_hash = context_sha256(context)
        job_name = _job_name(function, context_hash)
        ns = self.cfg.build_namespace
        try:
            url = self.upload_context(context, function, context_hash)
            progress(f"context of {function} stored in the bucket; creating Job {ns}/{job_name}")
            try:
                self.api.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs",
                                 self.job_body(job_name, function, image, url))
            except KubeError as exc:
                if exc.status != 409:  # 409: this context's Job exists already; follow it
                    raise
                progress(f"Job {ns}/{job_name} exists: following it")
            deadline = started + self.cfg.build_timeout_s
            while True:
                job = self.api.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{job_name}")
                conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                              if c.get("status") == "True"}
                if "Complete" in conditions:
                    return BuildOutcome(image, self._log(job_name), time.monotonic() - started)
                if "Failed" in conditions:
                    reason = conditions["Failed"].get("message") or conditions["Failed"].get("reason") or "failed"
                    raise BuildFailed(f"build Job {ns}/{job_name} failed: {reason}", self._log(job_name))
                if time.monotonic() > deadline:
                    raise BuildFailed(f"build Job {ns}/{job_name} did not finish in {self.cfg.build_timeout_s:.0f} s",
                                      self._log(job_name))
                self.sleep(self.poll_s)
        except KubeError as exc:
            raise BuildFailed(f"could not run the build Job {ns}/{job_name}: {exc}") from None


def builder_for(cfg: Settings | None = None) -> Builder | None:
    """The configured builder (CS_BUILDER), None for `none`."""
    cfg = cfg or settings()
    kind = cfg.builder.strip().lower()
    if kind in ("", "none"):
        return None
    if kind == "podman":
        return PodmanBuilder(cfg=cfg)
    if kind == "kubernetes":
        return KubernetesJobBuilder(cfg)
    raise ValueError(f"CS_BUILDER must be podman, kubernetes or none, not {cfg.builder!r}")


# --------------------------------------------------------------------------- platform functions


PLATFORM_FUNCTIONS = ("registry-fn", "gateway-fn")


def stack_images(environ: dict[str, str] | None = None) -> dict[str, str]:
    """stack.yml's image of each platform function (what `faas-cli deploy` and the local provider deploy)."""
    from customscripts.faas.build import load_stack

    functions = load_stack(environ=environ).get("functions") or {}
    return {name: str(fn["image"]) for name, fn in functions.items() if fn.get("image")}


def build_platform(builder: Builder, names: tuple[str, ...] = PLATFORM_FUNCTIONS, *,
                   render: Callable[[str], Any] | None = None, progress: Progress = _noop) -> list[dict[str, Any]]:
    """Build stack.yml's functions from their shrinkwrapped contexts (`build.render_stack_function`,
    functions/<fn>/) into the images stack.yml names; one result per function, failures included."""
    if render is None:
        from customscripts.faas.build import render_stack_function

        def render(name: str) -> Path:
            return render_stack_function(name).path
    wanted = stack_images()
    results = []
    for name in names:
        image = wanted.get(name)
        if image is None:
            results.append({"function": name, "status": "failed", "error": f"{name} is not in stack.yml"})
            continue
        try:
            rendered = render(name)  # a BuildResult (its .path) or the folder itself
            outcome = builder.build(Path(getattr(rendered, "path", rendered)), image, progress=progress)
        except BuildFailed as exc:
            results.append({"function": name, "image": image, "status": "failed", "error": str(exc),
                            "log": exc.log[-4000:]})
        else:
            results.append({"function": name, "image": outcome.image, "status": "built",
                            "seconds": round(outcome.duration_s, 1)})
    return results
