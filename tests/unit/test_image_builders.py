"""Builders and images without a cluster or a build: the Kubernetes Job builder against a fake Kubernetes
API server (real HTTP on loopback) and a fake bucket, the engine's host flags, image and base names."""

from __future__ import annotations

import gzip
import io
import json
import resource
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from customscripts.config import REPO_ROOT, Settings
from customscripts.faas import build, images
from customscripts.faas.builder import (
    BuildFailed,
    KubeApi,
    KubernetesJobBuilder,
    _job_name,
    builder_for,
    context_tarball,
    image_for_context,
)

TEMPLATE = yaml.safe_load_all((REPO_ROOT / "deploy/k8s/base/builder/image-builder.yaml").read_text())
CRONJOB = next(doc for doc in TEMPLATE if doc and doc["kind"] == "CronJob")
NS = CRONJOB["metadata"]["namespace"]


class FakeKubernetes:
    """The API paths the builder uses; Jobs finish as `outcome` says after `polls` reads."""

    def __init__(self, outcome: str = "Complete", polls: int = 2) -> None:
        self.outcome, self.polls = outcome, polls
        self.jobs: dict[str, dict[str, Any]] = {}
        self.reads: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, raw: bool = False) -> None:
                data = body.encode() if raw else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, self.headers.get("Authorization")))
                if self.path == f"/apis/batch/v1/namespaces/{NS}/cronjobs/image-builder":
                    return self._send(200, CRONJOB)
                if self.path.startswith(f"/apis/batch/v1/namespaces/{NS}/jobs/"):
                    name = self.path.rsplit("/", 1)[1]
                    if name not in fake.jobs:
                        return self._send(404, {"reason": "NotFound"})
                    fake.reads[name] = fake.reads.get(name, 0) + 1
                    job = fake.jobs[name]
                    if fake.reads[name] >= fake.polls:
                        job["status"] = {"conditions": [{"type": fake.outcome, "status": "True",
                                                         "message": "BackoffLimitExceeded"}]}
                    return self._send(200, job)
                if self.path.startswith(f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name%3D"):
                    job = self.path.rsplit("%3D", 1)[1]
                    return self._send(200, {"items": [{"metadata": {"name": f"{job}-abcde"}}]})
                if self.path.startswith(f"/api/v1/namespaces/{NS}/pods/") and "/log" in self.path:
                    return self._send(200, "#5 [build 3/9] RUN pip install\nexporting to image\n", raw=True)
                return self._send(404, {"reason": "NotFound"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, self.headers.get("Authorization")))
                if self.path != f"/apis/batch/v1/namespaces/{NS}/jobs":
                    return self._send(404, {})
                name = body["metadata"]["name"]
                if name in fake.jobs:
                    return self._send(409, {"reason": "AlreadyExists"})
                fake.jobs[name] = body
                return self._send(201, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeBucket:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, bucket: str, key: str, data: io.BytesIO, length: int, content_type: str = "") -> None:
        self.objects[key] = data.read()
        assert len(self.objects[key]) == length

    def presigned_get_object(self, bucket: str, key: str, expires: Any) -> str:
        return f"http://minio.example:9000/{bucket}/{key}?X-Amz-Expires={int(expires.total_seconds())}"


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """A script version's build context as the renderer writes it (stamp included)."""
    ctx = tmp_path / "cs-sma-abc-v3"
    (ctx / "function").mkdir(parents=True)
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    (ctx / "index.py").write_text("print('hi')\n")
    (ctx / "function" / "script.py").write_text("def run(ctx):\n    return 1\n")
    (ctx / build.BUILD_STAMP).write_text(json.dumps({"function": "cs-sma-abc-v3", "code_sha256": "ab" * 32,
                                                     "context_sha256": "cd" * 32}))
    return ctx


def _builder(fake: FakeKubernetes, bucket: FakeBucket, **cfg: Any) -> KubernetesJobBuilder:
    settings = Settings(builder="kubernetes", build_namespace=NS, image_prefix="registry.example.com/cs", **cfg)
    return KubernetesJobBuilder(settings, api=KubeApi(settings, base_url=fake.url, token="sa-token"), s3=bucket,
                                poll_s=0, sleep=lambda _s: None)


def test_kubernetes_builder_runs_a_job_from_the_template_and_returns_its_log(context: Path) -> None:
    fake, bucket = FakeKubernetes("Complete", polls=3), FakeBucket()
    try:
        image = image_for_context(context, "registry.example.com/cs")
        assert image == "registry.example.com/cs/cs-sma-abc-v3:" + "ab" * 6
        outcome = _builder(fake, bucket).build(context, image)
    finally:
        fake.close()
    assert outcome.image == image and "exporting to image" in outcome.log
    key = f"builds/cs-sma-abc-v3/{'cd' * 32}.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(bucket.objects[key]), mode="r:gz") as tar:
        assert {"Dockerfile", "index.py", "function/script.py"} <= set(tar.getnames())
    (name, job), = fake.jobs.items()
    assert name == _job_name("cs-sma-abc-v3", "cd" * 32) and len(name) <= 63
    template_spec = CRONJOB["spec"]["jobTemplate"]["spec"]
    pod = job["spec"]["template"]["spec"]
    # the template's hardening is kept as is: only the two variables change
    assert pod["securityContext"] == template_spec["template"]["spec"]["securityContext"]
    assert pod["automountServiceAccountToken"] is False and job["spec"]["backoffLimit"] == 1
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["CS_BUILD_IMAGE"] == image and env["CS_BUILD_CONTEXT_URL"].startswith("http://minio.example:9000/")
    assert [e["name"] for e in pod["containers"][0]["env"]].count("CS_BUILD_IMAGE") == 1
    assert all(auth == "Bearer sa-token" for _, _, auth in fake.requests)


def test_kubernetes_builder_reports_a_failed_job_with_its_log(context: Path) -> None:
    fake = FakeKubernetes("Failed")
    try:
        with pytest.raises(BuildFailed, match="BackoffLimitExceeded") as failed:
            _builder(fake, FakeBucket()).build(context, "registry.example.com/cs/x:1")
    finally:
        fake.close()
    assert "RUN pip install" in failed.value.log


def test_kubernetes_builder_follows_a_job_that_exists(context: Path) -> None:
    """A retry after a crash (or another replica) finds the context's Job already created: it follows
    that one instead of failing or starting a second build."""
    fake = FakeKubernetes("Complete")
    try:
        builder = _builder(fake, FakeBucket())
        builder.build(context, "registry.example.com/cs/x:1")
        fake.reads.clear()
        outcome = builder.build(context, "registry.example.com/cs/x:1")
    finally:
        fake.close()
    assert len(fake.jobs) == 1 and outcome.image == "registry.example.com/cs/x:1"


def test_kubernetes_builder_without_an_api_fails_the_build_clearly(context: Path) -> None:
    builder = _builder(FakeKubernetesUnreachable(), FakeBucket())
    with pytest.raises(BuildFailed, match="could not run the build Job"):
        builder.build(context, "registry.example.com/cs/x:1")


class FakeKubernetesUnreachable:
    url = "http://127.0.0.1:9"  # discard port: nothing listens


def test_context_tarball_is_deterministic(context: Path) -> None:
    first = context_tarball(context)
    (context / "function" / "__pycache__").mkdir()
    (context / "function" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert context_tarball(context) == first
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(first))) as tar:
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_builder_for_reads_cs_builder() -> None:
    assert builder_for(Settings(builder="none")) is None
    assert builder_for(Settings(builder="podman")).name == "podman"
    assert builder_for(Settings(builder="kubernetes")).name == "kubernetes"
    with pytest.raises(ValueError, match="CS_BUILDER"):
        builder_for(Settings(builder="docker-hub"))


def test_engine_rlimits_stay_at_or_below_the_hosts_hard_limits(monkeypatch) -> None:
    """runc fails to start a container whose rlimits exceed the session's hard limits."""
    real = resource.getrlimit
    limits = {resource.RLIMIT_NOFILE: (1024, 2048), resource.RLIMIT_NPROC: (100, 512)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits.get(which) or real(which))
    monkeypatch.setattr(images.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "podman" else None)
    engine = images.find_engine(Settings(container_nofile=4096, container_nproc=1024, container_engine=""))
    assert engine.runtime_flags() == ["--runtime", "runc", "--ulimit", "nofile=2048:2048",
                                      "--ulimit", "nproc=512:512"]
    assert engine.run_command("--rm", "img")[:3] == ["/usr/bin/podman", "run", "--runtime"]


def test_no_engine_is_one_clear_reason(monkeypatch) -> None:
    monkeypatch.setattr(images.shutil, "which", lambda name: None)
    status = images.probe(fresh=True)
    assert not status.usable and status.engine is None
    assert "podman is not installed" in status.reason and "\n" not in status.reason


def test_base_image_name_follows_its_package_list() -> None:
    ref = images.base_image_ref()
    assert ref.startswith("localhost/customscripts/base:bookworm-")
    assert images.base_image_ref(("python3", "python3-venv")) != ref
    assert images.base_image_ref(tuple(reversed(images.BASE_PACKAGES))) == ref
    # the sandbox's seccomp layer needs libseccomp; bubblewrap is not in images (process isolation)
    assert "libseccomp2" in images.BASE_PACKAGES and "bubblewrap" not in images.BASE_PACKAGES


def test_wheelhouse_key_follows_the_requirements(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("numpy>=1.26\n")
    b.write_text("redis>=5\n")
    key = images.wheelhouse_key([a, b])
    assert images.wheelhouse_key([a, b]) == key
    b.write_text("redis>=6\n")
    assert images.wheelhouse_key([a, b]) != key


def test_pip_configuration_reaches_the_container_read_only(monkeypatch, tmp_path: Path) -> None:
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"file://{index}")
    volumes, env = images._pip_config_mounts()
    assert f"{index.parent}:{index.parent}:ro" in volumes  # the index's files lie beside `simple`
    assert f"PIP_EXTRA_INDEX_URL=file://{index}" in env


def test_dockerfile_keeps_the_contract() -> None:
    text = (REPO_ROOT / "templates/python3-http/Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    assert "ARG WATCHDOG_IMAGE=ghcr.io/openfaas/of-watchdog:0.11." in text
    assert 'upstream_url="http://127.0.0.1:5000"' in text and 'mode="http"' in text
    assert "USER 10001:10001" in text and 'CS_ISOLATION="process"' in text
    assert "compileall" in text and 'PYTHONDONTWRITEBYTECODE="1"' in text
    # the watchdog image is named only by a stage that `WATCHDOG=none` builds never reach
    watchdog_stage = text.index("FROM ${WATCHDOG_IMAGE}")
    assert text.index("FROM build AS ship-none") < watchdog_stage < text.index("FROM build AS ship-of-watchdog")
    assert text.rstrip().endswith("FROM ship-${WATCHDOG}")


def test_build_worker_runs_as_the_builder_identity_with_a_projected_token() -> None:
    docs = list(yaml.safe_load_all((REPO_ROOT / "deploy/k8s/base/builder/build-worker.yaml").read_text()))
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    binding = next(d for d in TEMPLATE if d and d["kind"] == "RoleBinding")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == binding["subjects"][0]["name"]  # the one identity that may create Jobs
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["command"][:3] == ["customscripts", "build", "--worker"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    defaults = Settings()
    assert mounts["api-token"] == str(Path(defaults.k8s_token_file).parent) == str(Path(defaults.k8s_ca_file).parent)
    sources = {v["name"]: v for v in spec["volumes"]}["api-token"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == Path(defaults.k8s_token_file).name
