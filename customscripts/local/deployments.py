"""The local provider's deployments: FunctionDeployment bodies checked as faas-netes checks them, the
FunctionStatus it answers, and their persistence in `<state>/provider/functions.json`, so a provider
restart keeps what was deployed."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from customscripts.faas.build import LABEL as LABEL_PREFIX
from customscripts.faas.naming import METRICS_PORT_ANNOTATION, SERVICE_PORT_ANNOTATION, is_dns1123, label_value

NAMESPACE = "openfaas-fn"
_STR_MAPS = ("envVars", "labels", "annotations")
_STR_LISTS = ("secrets", "constraints")


class DeployError(Exception):
    """A deployment the gateway refuses, with the HTTP status faas-netes answers it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_deployment(body: Any) -> dict[str, Any]:
    """Check a FunctionDeployment the way faas-netes does (400 on anything malformed)."""
    if not isinstance(body, dict):
        raise DeployError("request body must be a FunctionDeployment JSON object")
    service = body.get("service")
    if not isinstance(service, str) or not service:
        raise DeployError("service: is required")
    if not is_dns1123(service):
        raise DeployError(f"(\"{service}\") must be a valid DNS entry for service name")
    if not isinstance(body.get("image"), str) or not body["image"]:
        raise DeployError("image: is required")
    namespace = body.get("namespace") or ""
    if namespace not in ("", NAMESPACE):
        raise DeployError(f"namespace must be: {NAMESPACE}")
    for key in _STR_MAPS:
        value = body.get(key)
        if value is not None and (not isinstance(value, dict)
                                  or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise DeployError(f"{key}: must be a map of strings")
    for key in _STR_LISTS:
        value = body.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise DeployError(f"{key}: must be a list of strings")
    for key in ("limits", "requests"):
        value = body.get(key)
        if value is not None and (not isinstance(value, dict)
                                  or not all(isinstance(v, str) for v in value.values())):
            raise DeployError(f"{key}: must be an object of strings")
    for key in ("envProcess",):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise DeployError(f"{key}: must be a string")
    if body.get("readOnlyRootFilesystem") is not None and not isinstance(body["readOnlyRootFilesystem"], bool):
        raise DeployError("readOnlyRootFilesystem: must be a boolean")
    for key, value in (body.get("labels") or {}).items():
        if label_value(value) != value:
            raise DeployError(f"label {key}: value {value!r} is not a valid label value (<= 63 chars)")
    clean = {k: v for k, v in body.items() if v is not None}
    clean["namespace"] = NAMESPACE
    return clean


def service_port(spec: Mapping[str, Any]) -> int | None:
    """The port a deployment asked to be served on (a service: always running), if any."""
    raw = (spec.get("annotations") or {}).get(SERVICE_PORT_ANNOTATION)
    return int(raw) if raw else None


def is_platform(spec: Mapping[str, Any]) -> bool:
    """registry-fn and gateway-fn (stack.yml labels them), as opposed to a script version's function."""
    return (spec.get("labels") or {}).get(f"{LABEL_PREFIX}.kind") == "platform"


def kind(spec: Mapping[str, Any]) -> str:
    """platform or script (a bounded metric label, never the function's name)."""
    return "platform" if is_platform(spec) else "script"


def function_status(name: str, entry: Mapping[str, Any], *, running: bool, service_address: str,
                    metrics_port: int) -> dict[str, Any]:
    """The FunctionStatus body of one deployment, as faas-netes answers it (replicas always 1)."""
    spec = entry["spec"]
    return {
        "name": name,
        "image": spec["image"],
        "namespace": NAMESPACE,
        "envProcess": spec.get("envProcess", ""),
        "envVars": spec.get("envVars") or {},
        "constraints": spec.get("constraints") or [],
        "secrets": spec.get("secrets") or [],
        "labels": spec.get("labels") or {},
        "annotations": {**(spec.get("annotations") or {}),
                        SERVICE_PORT_ANNOTATION: service_address,
                        **({METRICS_PORT_ANNOTATION: str(metrics_port)} if running and metrics_port else {})},
        "limits": spec.get("limits"),
        "requests": spec.get("requests"),
        "readOnlyRootFilesystem": bool(spec.get("readOnlyRootFilesystem", False)),
        "invocationCount": entry.get("invocationCount", 0),
        "replicas": 1,
        "availableReplicas": 1 if running else 0,
        "createdAt": entry["createdAt"],
    }


class DeploymentStore:
    """`functions.json` in the provider's state folder: name -> {spec, createdAt, invocationCount, port}."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "functions.json"

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {name: entry for name, entry in data.get("functions", {}).items()
                if isinstance(entry, dict) and "spec" in entry}

    def save(self, deployments: Mapping[str, Any]) -> None:
        """Written whole to a temporary file, then renamed: a crash leaves the old file or the new one."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"functions": dict(deployments)}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
