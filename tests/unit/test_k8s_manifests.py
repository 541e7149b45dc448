"""deploy/k8s read as a cluster would: every overlay renders and validates, nothing points at the local stack,
every referenced Secret exists with a value, the network allows exactly the platform's paths, and each
namespace's Pod Security level admits what runs there (faas-netes' script function pods included)."""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from customscripts import cli
from customscripts.config import REPO_ROOT, SECRET_SETTINGS, settings
from customscripts.faas.build import deployment, load_stack, stack_deployments
from scheduler.main import SCHEDULER_SECRETS
from tests.unit.k8s_support import (
    EXTERNAL,
    K8S_DIR,
    OVERLAYS,
    Cluster,
    Pod,
    containers,
    documents,
    example_secrets,
    faas_netes_pod,
    find,
    one,
    pod_security_violations,
    pod_template,
    render,
    secret_value_for,
    workloads,
)

# The oldest Kubernetes the manifests target (appArmorProfile, sidecar-free Jobs) and the newest schemas the
# installed kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31.0", latest_version())
LOCAL_STACK = re.compile(r"\b(54329|63799|42229|42230|18333|127\.0\.0\.1|localhost)\b")
ENDPOINT_SETTINGS = ("CS_PG_HOST", "CS_PG_PORT", "CS_REDIS_HOST", "CS_REDIS_PORT", "CS_NATS_HOST", "CS_NATS_PORT",
                     "CS_S3_ENDPOINT", "OPENFAAS_URL", "CS_GATEWAY_URL", "CS_FUNCTION_URL_TEMPLATE")
# Services the manifests rely on but do not create: the OpenFaaS chart's gateway, faas-netes' function Services.
EXTERNAL_SERVICES = {("gateway", "openfaas"): 8080, ("gateway-fn", "openfaas-fn"): 8080,
                     ("{name}", "openfaas-fn"): 8080}
PLATFORM_NAMESPACES = ("customscripts", "customscripts-data")


@pytest.fixture(scope="module", autouse=True)
def _schemas_read_once() -> Iterator[None]:
    """kubernetes-validate parses its schema files for every resource; read each once per module."""
    original = kv_utils.schema_contents
    kv_utils.schema_contents = functools.cache(original)
    yield
    kv_utils.schema_contents = original


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    workdir = tmp_path_factory.mktemp("k8s")
    return {overlay: render(overlay, workdir) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def docs(rendered: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {overlay: documents(text) for overlay, text in rendered.items()}


def test_overlays_exist() -> None:
    assert {"production", "evaluation"} <= set(OVERLAYS)


# --------------------------------------------------------------------------- render + schema


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_validates_strictly(docs: dict[str, list[dict[str, Any]]], overlay: str,
                                           version: str) -> None:
    failures = []
    for doc in docs[overlay]:
        name = f"{doc['kind']} {doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except SchemaNotFoundError as exc:
            failures.append(f"{name}: {exc.message}")
    assert not failures, "\n".join(failures)
    assert len(docs[overlay]) > 50


def test_a_missing_secret_fails_the_render_naming_it(tmp_path: Path) -> None:
    secrets = {key: secret_value_for(key) for key in example_secrets()}
    del secrets["CS_PG_PASSWORD"]
    with pytest.raises(RuntimeError, match="CS_PG_PASSWORD"):
        render("production", tmp_path, secrets)


# --------------------------------------------------------------------------- endpoints and settings


def _platform_config(docs: list[dict[str, Any]]) -> dict[str, str]:
    maps = [m for m in find(docs, "ConfigMap", namespace="customscripts")
            if m["metadata"]["name"].startswith("customscripts-platform")]
    assert len(maps) == 1
    return maps[0]["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_points_at_the_local_stack(rendered: dict[str, str], overlay: str) -> None:
    assert LOCAL_STACK.findall(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_endpoint_names_a_service_that_exists(docs: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    config = _platform_config(docs[overlay])
    config_source = (REPO_ROOT / "customscripts" / "config.py").read_text()
    unknown = [key for key in config if f'"{key}"' not in config_source]
    assert unknown == [], f"not settings of customscripts/config.py: {unknown}"
    assert config["CS_ENV"] == "production"
    services = {(s["metadata"]["name"], s["metadata"]["namespace"]): {p["port"] for p in s["spec"]["ports"]}
                for s in find(docs[overlay], "Service")}
    pairs = [(config["CS_PG_HOST"], config["CS_PG_PORT"]), (config["CS_REDIS_HOST"], config["CS_REDIS_PORT"]),
             (config["CS_NATS_HOST"], config["CS_NATS_PORT"]), tuple(config["CS_S3_ENDPOINT"].rsplit(":", 1))]
    pairs += [re.match(r"https?://([^:/]+):(\d+)", config[key]).groups()
              for key in ("OPENFAAS_URL", "CS_GATEWAY_URL", "CS_FUNCTION_URL_TEMPLATE")]
    for host, port in pairs:
        name, namespace, *rest = host.rstrip(".").split(".")
        assert rest == ["svc", "cluster", "local"], host
        ports = services.get((name, namespace)) or {EXTERNAL_SERVICES.get((name, namespace))}
        assert int(port) in ports, f"{host}:{port} is no Service port ({ports})"
    for key in ENDPOINT_SETTINGS:
        assert config.get(key), f"{key} is not set: it would fall back to the local stack"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_platform_pods_take_their_settings_from_the_platform_config(docs: dict[str, list[dict[str, Any]]],
                                                                    overlay: str) -> None:
    for doc in workloads(docs[overlay]):
        if doc["metadata"]["namespace"] != "customscripts":
            continue
        _, spec = pod_template(doc)
        for c in containers(spec):
            refs = [e["configMapRef"]["name"] for e in c.get("envFrom", [])]
            assert any(r.startswith("customscripts-platform") for r in refs), doc["metadata"]["name"]
            assert not [e for e in c.get("env", []) if "secret" in e["name"].lower()], "secrets are files"


def test_the_functions_get_production_endpoints_from_the_readme() -> None:
    """stack.yml's envsubst defaults are the local stack's; the guide exports the cluster's before faas-cli."""
    guide = (K8S_DIR / "README.md").read_text()
    exported = set(re.findall(r"^\s*export ([A-Z_]+)=", guide, re.MULTILINE))
    local_defaults = set(re.findall(r"\$\{([A-Z_]+):-[^}]*(?:127\.0\.0\.1|54329|63799|42229|18333)[^}]*\}",
                                    (REPO_ROOT / "stack.yml").read_text()))
    assert local_defaults and local_defaults <= exported, local_defaults - exported


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_has_its_value_from_the_one_env_file(docs: dict[str, list[dict[str, Any]]],
                                                          overlay: str) -> None:
    secrets = find(docs[overlay], "Secret")
    assert not [s for s in secrets if s["metadata"]["name"] == "customscripts-secrets-env"], "build-time only"
    by_file = {file: env for file, env in SECRET_SETTINGS.values()}
    for s in secrets:
        for key, value in s["data"].items():
            decoded = base64.b64decode(value).decode()
            assert decoded, f"{s['metadata']['namespace']}/{s['metadata']['name']}: {key} is empty"
            if key in by_file:
                assert decoded == secret_value_for(by_file[key])


def test_the_env_file_documents_exactly_the_secret_settings() -> None:
    assert set(example_secrets()) == {env for _, env in SECRET_SETTINGS.values()}
    assert all(value == "" for value in example_secrets().values()), "no real or usable value is committed"
    assert "secrets.env" in (K8S_DIR / "secrets" / ".gitignore").read_text().split()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_a_function_or_pod_uses_exists(docs: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    present = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in find(docs[overlay], "Secret")}
    wanted = {("openfaas-fn", file) for file, _ in SECRET_SETTINGS.values()}
    wanted |= {("openfaas-fn", name) for fn in load_stack()["functions"].values() for name in fn.get("secrets", [])}
    body = deployment("sma", 1, owner_id="alice", tenant="acme", code_hash="0" * 64, tier="pro")
    wanted |= {("openfaas-fn", name) for name in body["secrets"]}
    wanted.add(("openfaas", "basic-auth"))
    for doc in workloads(docs[overlay]):
        namespace = doc["metadata"]["namespace"]
        _, spec = pod_template(doc)
        for volume in spec.get("volumes", []):
            for source in (volume.get("projected") or {}).get("sources", []):
                if "secret" in source:  # (not a service account token or a ConfigMap)
                    wanted.add((namespace, source["secret"]["name"]))
            if "secret" in volume and doc["metadata"]["name"] != "image-builder":  # registry-push: README step
                wanted.add((namespace, volume["secret"]["secretName"]))
        for c in containers(spec):
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    wanted.add((namespace, ref["name"]))
    assert wanted - present == set()
    basic_auth = one(docs[overlay], "Secret", "basic-auth", "openfaas")["data"]
    assert set(basic_auth) == {"basic-auth-user", "basic-auth-password"}


# --------------------------------------------------------------------------- workloads


def test_scheduler_deployment(docs: dict[str, list[dict[str, Any]]]) -> None:
    rendered = docs["production"]
    dep = one(rendered, "Deployment", "customscripts-scheduler", "customscripts")
    meta, spec = pod_template(dep)
    (c,) = spec["containers"]
    registry, _, tag = c["image"].rpartition(":")
    assert "/" in registry and tag and tag != "latest", c["image"]
    assert dep["spec"]["replicas"] >= 2, "replicas share the durable consumer"
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
    # liveness on the ops listener's /healthz, readiness on /readyz (PostgreSQL, Redis, NATS: customscripts/metrics.py)
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert meta["annotations"]["prometheus.io/path"] == "/metrics"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    (port,) = c["ports"]
    annotations = meta["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert _platform_config(rendered)["CS_SCHEDULER_METRICS_PORT"] == str(port["containerPort"])
    assert _platform_config(rendered)["CS_SCHEDULER_METRICS_ADDR"] == "0.0.0.0"
    projected = {s["secret"]["name"] for v in spec["volumes"] for s in (v.get("projected") or {}).get("sources", [])}
    assert projected == {SECRET_SETTINGS[name][0] for name in SCHEDULER_SECRETS}
    # the batch's stop grace, then the hand-back and a bounded NATS close, fit in the pod's grace
    stop_grace = float(_platform_config(rendered).get("CS_SCHEDULER_STOP_GRACE_S", settings().scheduler_stop_grace_s))
    assert spec["terminationGracePeriodSeconds"] >= stop_grace + 10
    pdb = one(rendered, "PodDisruptionBudget", "customscripts-scheduler", "customscripts")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert pdb["spec"].get("maxUnavailable") == 1


def test_migration_job_runs_the_package_migrations(docs: dict[str, list[dict[str, Any]]]) -> None:
    job = one(docs["production"], "Job", "customscripts-migrate", "customscripts")
    _, spec = pod_template(job)
    (c,) = spec["containers"]
    assert c["command"] == ["customscripts", "migrate"]
    assert cli.build_parser().parse_args(["migrate"]).func is cli._migrate
    projected = {s["secret"]["name"] for v in spec["volumes"] for s in (v.get("projected") or {}).get("sources", [])}
    assert projected == {"pg-password", "pg-reader-password"}
    assert c["image"] == one(docs["production"], "Deployment", "customscripts-scheduler")["spec"]["template"][
        "spec"]["containers"][0]["image"]


def test_data_services_are_statefulsets_with_volumes(docs: dict[str, list[dict[str, Any]]]) -> None:
    sets = {s["metadata"]["name"]: s for s in find(docs["production"], "StatefulSet", namespace="customscripts-data")}
    assert set(sets) == {"timescaledb", "redis", "nats", "minio"}
    assert "timescale/timescaledb:" in sets["timescaledb"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "--jetstream" in sets["nats"]["spec"]["template"]["spec"]["containers"][0]["args"]
    for name, s in sets.items():
        claims = s["spec"]["volumeClaimTemplates"]
        (c,) = s["spec"]["template"]["spec"]["containers"]
        assert {m["name"] for m in c["volumeMounts"]} >= {claims[0]["metadata"]["name"]}, name
        assert "readinessProbe" in c and "livenessProbe" in c, name


def test_image_builder_template(docs: dict[str, list[dict[str, Any]]]) -> None:
    rendered = docs["production"]
    cron = one(rendered, "CronJob", "image-builder", "customscripts-build")
    assert cron["spec"]["suspend"] is True, "a template: applying it must start nothing"
    meta, spec = pod_template(cron)
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert {"CS_BUILD_CONTEXT_URL", "CS_BUILD_IMAGE"} <= set(env)
    assert any("$(CS_BUILD_CONTEXT_URL)" in a for a in c["args"]) and any("$(CS_BUILD_IMAGE)" in a for a in c["args"])
    assert "rootless" in c["image"]
    assert {v["name"]: v for v in spec["volumes"]}["registry-auth"]["secret"]["secretName"] == "registry-push"
    # rootless BuildKit needs exactly two exceptions to baseline: seccomp and AppArmor unconfined
    assert sorted(pod_security_violations(meta, spec, "baseline")) == [
        "AppArmor Unconfined (container buildkit)", "seccomp Unconfined (container buildkit)"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    binding = one(rendered, "RoleBinding", "image-builder", "customscripts-build")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "customscripts-builder",
                                    "namespace": "customscripts"}]


# --------------------------------------------------------------------------- Pod Security


def _levels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {ns["metadata"]["name"]: ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
            for ns in find(docs, "Namespace")}


def _script_bodies() -> list[dict[str, Any]]:
    return [deployment(script_id, version, owner_id="alice", tenant="acme", code_hash="ab" * 32, tier=tier)
            for tier in settings().tiers for script_id, version in (("sma", 1), ("momentum_breadth_" * 3, 12))]


def test_namespace_levels(docs: dict[str, list[dict[str, Any]]]) -> None:
    levels = _levels(docs["production"])
    assert levels == {"openfaas": "baseline", "openfaas-fn": "baseline", "customscripts": "restricted",
                      "customscripts-data": "restricted", "customscripts-build": "privileged"}


@pytest.mark.parametrize("set_non_root_user", [True, False])
def test_function_namespace_admits_the_pods_faas_netes_creates(docs: dict[str, list[dict[str, Any]]],
                                                               set_non_root_user: bool) -> None:
    level = _levels(docs["production"])["openfaas-fn"]
    bodies = _script_bodies() + stack_deployments(local=False)
    for body in bodies:
        pod = faas_netes_pod(body, set_non_root_user=set_non_root_user)
        kubernetes_validate.validate(pod, latest_version(), strict=True)
        meta, spec = pod_template(pod)
        assert pod_security_violations(meta, spec, level) == [], body["service"]
        # the old manifests enforced `restricted` here: it rejects every function pod
        assert pod_security_violations(meta, spec, "restricted"), body["service"]


def test_values_match_the_function_namespace(docs: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((K8S_DIR / "openfaas" / "values.yaml").read_text())
    assert values["functionNamespace"] == "openfaas-fn" in _levels(docs["production"])
    assert values["openfaasPro"] is False and values["basic_auth"] is True
    assert values["generateBasicAuth"] is False  # the overlay's basic-auth Secret is the one the gateway reads
    assert values["functions"]["setNonRootUser"] is True  # as test_function_namespace_admits... checks


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_admitted_and_ours_are_restricted(docs: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    levels = _levels(docs[overlay])
    for doc in workloads(docs[overlay]):
        namespace = doc["metadata"]["namespace"]
        meta, spec = pod_template(doc)
        assert pod_security_violations(meta, spec, levels[namespace]) == [], doc["metadata"]["name"]
        if namespace in PLATFORM_NAMESPACES:
            assert levels[namespace] == "restricted"
            assert spec.get("automountServiceAccountToken") is False, doc["metadata"]["name"]
            for c in containers(spec):
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, doc["metadata"]["name"]


# --------------------------------------------------------------------------- NetworkPolicy

TCP_PROBES = (22, 53, 80, 443, 2379, 4222, 5432, 6379, 6443, 8080, 8081, 8082, 8222, 9000, 9090, 9464, 10250)


def _probes() -> list[tuple[int, str]]:
    return [(port, "TCP") for port in TCP_PROBES] + [(53, "UDP")]


def _universe(docs: list[dict[str, Any]]) -> list[Pod]:
    """Every kind of pod the cluster holds: ours (from the manifests), OpenFaaS', faas-netes' functions, DNS,
    and impostors wearing our labels in the wrong place."""
    pods = []
    for doc in workloads(docs):
        meta, _ = pod_template(doc)
        pods.append(Pod(doc["metadata"]["name"], doc["metadata"]["namespace"], meta.get("labels") or {}))
    for body in _script_bodies()[:2] + stack_deployments(local=False):
        meta, _ = pod_template(faas_netes_pod(body))
        pods.append(Pod(body["service"], "openfaas-fn", meta["labels"]))
    pods += [
        Pod("openfaas-gateway", "openfaas", {"app": "gateway"}),
        Pod("openfaas-queue-worker", "openfaas", {"app": "queue-worker"}),
        Pod("openfaas-prometheus", "openfaas", {"app": "prometheus"}),
        Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}),
        Pod("prometheus", "monitoring", {"app": "prometheus"}),
        Pod("someone-elses-function", "openfaas-fn", {"faas_function": "nodeinfo"}),
        Pod("script-named-registry", "openfaas-fn", {"faas_function": "registry-fn",
                                                     "com.customscripts.kind": "script"}),
        Pod("fake-scheduler", "default", {"app.kubernetes.io/name": "customscripts-scheduler"}),
        Pod("fake-platform-fn", "default", {"faas_function": "registry-fn", "com.customscripts.kind": "platform"}),
        EXTERNAL,
    ]
    return pods


def _cluster(docs: list[dict[str, Any]]) -> Cluster:
    return Cluster.from_docs(docs, extra_namespaces=("kube-system", "default", "monitoring"))


def _peer_pods(docs: list[dict[str, Any]], predicate) -> set[str]:
    return {p.name for p in _universe(docs) if predicate(p)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_script_functions_reach_only_gateway_fn_and_dns(docs: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    cluster = _cluster(docs[overlay])
    universe = _universe(docs[overlay])
    for body in _script_bodies():
        meta, _ = pod_template(faas_netes_pod(body))
        script = Pod(body["service"], "openfaas-fn", meta["labels"])
        selecting = cluster.selecting(script, "Egress")
        assert any(p["metadata"]["name"] == "script-functions" for p in selecting)
        # structurally: every egress rule of every policy that selects a script pod
        for policy in selecting:
            for rule in policy["spec"].get("egress") or []:
                ports = {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports") or [{}]}
                assert rule.get("to"), f"{policy['metadata']['name']}: a rule without peers allows everything"
                for peer in rule["to"]:
                    assert "ipBlock" not in peer
                    dns = peer.get("podSelector") == {"matchLabels": {"k8s-app": "kube-dns"}} and peer.get(
                        "namespaceSelector") == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
                    gateway_fn = "namespaceSelector" not in peer and peer.get("podSelector") == {
                        "matchLabels": {"faas_function": "gateway-fn", "com.customscripts.kind": "platform"}}
                    assert dns or gateway_fn, peer
                    assert ports <= ({("UDP", 53), ("TCP", 53)} if dns else {("TCP", 8080)}), ports
        # and as traffic, against every pod of the cluster and every port in use
        reached = {(dst.name, port, proto) for dst in universe for port, proto in _probes()
                   if dst != script and cluster.egress_allows(script, dst, port, proto)}
        assert reached == {("gateway-fn", 8080, "TCP"), ("coredns", 53, "TCP"), ("coredns", 53, "UDP")}


def _expected_data_clients(overlay: str) -> dict[tuple[str, int], set[str]]:
    sample = {"customscripts-sample-load", "customscripts-sample-replay"} if overlay == "evaluation" else set()
    return {
        ("timescaledb", 5432): {"registry-fn", "gateway-fn", "customscripts-scheduler", "customscripts-migrate",
                                "customscripts-build-worker"} | sample,
        ("redis", 6379): {"registry-fn", "gateway-fn", "customscripts-scheduler"},
        ("nats", 4222): {"customscripts-scheduler"} | sample,
        ("nats", 8222): {"customscripts-scheduler"},  # /jsz: the consumer backlog gauges (customscripts/metrics.py)
        ("minio", 9000): {"registry-fn", "customscripts-scheduler", "image-builder", "customscripts-build-worker"},
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_data_namespace_admits_only_the_platform(docs: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    cluster = _cluster(docs[overlay])
    universe = _universe(docs[overlay])
    data = [p for p in universe if p.namespace == "customscripts-data"]
    assert {p.name for p in data} == {"timescaledb", "redis", "nats", "minio"}
    expected = _expected_data_clients(overlay)
    for dst in data:
        for port, proto in _probes():
            admitted = {src.name for src in universe if src != dst and cluster.connects(src, dst, port, proto)}
            assert admitted == expected.get((dst.name, port), set()) if proto == "TCP" else admitted == set(), (
                dst.name, port, proto)
        assert not any(cluster.egress_allows(dst, other, port, proto)
                       for other in universe for port, proto in _probes()), f"{dst.name} opens connections"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_platform_paths_are_open(docs: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    cluster = _cluster(docs[overlay])
    pods = {p.name: p for p in _universe(docs[overlay])}
    script = next(p for p in pods.values() if p.labels.get("com.customscripts.kind") == "script"
                  and p.name.startswith("cs-"))
    paths = [("openfaas-gateway", "registry-fn", 8080), ("openfaas-gateway", script.name, 8080),
             ("registry-fn", script.name, 8080), ("customscripts-scheduler", script.name, 8080),
             (script.name, "gateway-fn", 8080), ("registry-fn", "openfaas-gateway", 8080),
             ("customscripts-scheduler", "openfaas-gateway", 8080), ("prometheus", "customscripts-scheduler", 9464),
             ("prometheus", "registry-fn", 9464), ("prometheus", "gateway-fn", 9464), ("prometheus", script.name, 9464)]
    for src, dst, port in paths:
        assert cluster.connects(pods[src], pods[dst], port), (src, dst, port)
    closed = [(script.name, "registry-fn", 8080), (script.name, "openfaas-gateway", 8080),
              (script.name, "timescaledb", 5432), ("someone-elses-function", script.name, 8080),
              ("script-named-registry", "timescaledb", 5432), ("fake-platform-fn", "redis", 6379),
              ("image-builder", "timescaledb", 5432), ("gateway-fn", script.name, 8080)]
    # a function's ops listener (/metrics) is Prometheus' alone: no caller's path through the gateway reaches it
    closed += [(src, dst, 9464) for src in ("openfaas-gateway", "openfaas-queue-worker", "someone-elses-function",
                                            "registry-fn", "gateway-fn", "customscripts-scheduler")
               for dst in ("registry-fn", "gateway-fn", script.name) if src != dst]
    for src, dst, port in closed:
        assert not cluster.connects(pods[src], pods[dst], port), (src, dst, port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespace_of_ours_denies_by_default(docs: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for namespace in ("openfaas-fn", "customscripts", "customscripts-data", "customscripts-build"):
        deny = one(docs[overlay], "NetworkPolicy", "default-deny", namespace)["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_every_function_pod_is_scraped_on_its_ops_listener() -> None:
    """registry-fn, gateway-fn (stack.yml) and every script function (customscripts.faas.build.deployment) serve
    /metrics, /healthz, /readyz on CS_FN_METRICS_PORT on all the pod's interfaces, and their pods carry the
    prometheus.io annotations naming that port (faas-netes copies a function's annotations to its pods); it is
    never the watchdog's 8080, which the gateway proxies callers to."""
    bodies = [*stack_deployments(local=False), *_script_bodies()]
    assert {b["service"] for b in bodies} >= {"registry-fn", "gateway-fn"}
    for body in bodies:
        meta, spec = pod_template(faas_netes_pod(body))
        (c,) = containers(spec)
        env = {e["name"]: e["value"] for e in c["env"]}
        annotations = meta["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", body["service"]
        assert annotations["prometheus.io/path"] == "/metrics"
        assert annotations["prometheus.io/port"] == env["CS_FN_METRICS_PORT"] == "9464", body["service"]
        assert env["CS_FN_METRICS_ADDR"] == "0.0.0.0"
        assert int(env["CS_FN_METRICS_PORT"]) not in {p["containerPort"] for p in c["ports"]}
