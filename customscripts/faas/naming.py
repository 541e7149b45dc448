"""Kubernetes-safe names for per-version functions and their label values.

Function names are DNS-1123 labels (<= 63 chars, `[a-z0-9-]`, alphanumeric at both ends) because
faas-netes turns them into Deployment and Service names. The plain form `cs-{script_id}-v{version}`
is readable and injective; anything that needs rewriting or truncation gets a hash suffix instead,
in a shape (`...-h<hash>`) the plain form can never take, so two inputs never share a name.
"""

from __future__ import annotations

import hashlib
import re

from customscripts import ids

# A function's own loopback port in the local provider (its stand-in for a Kubernetes Service): set
# by a deployment that must always run there (gateway-fn), reported in every FunctionStatus.
SERVICE_PORT_ANNOTATION = "com.customscripts.local.service-port"
# The loopback port of a running function's ops listener (/metrics, /healthz, /readyz), named in its
# FunctionStatus as the Service port is; a pod's is CS_FN_METRICS_PORT (prometheus.io/port).
METRICS_PORT_ANNOTATION = "com.customscripts.local.metrics-port"

MAX_NAME = 63
PREFIX = "cs"
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_HASH_LEN = 10


def is_dns1123(name: object) -> bool:
    """True for a valid DNS-1123 label of at most 63 characters (what faas-netes accepts)."""
    return isinstance(name, str) and len(name) <= MAX_NAME and bool(_DNS1123.match(name))


def _digest(text: str, length: int = _HASH_LEN) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def function_name(script_id: str, version: int | str) -> str:
    """The function name of one published version: deterministic, DNS-1123, <= 63 chars."""
    sid = ids.script_id(script_id)
    ver = ids.version(version)
    plain = f"{PREFIX}-{sid}-v{ver}"
    if is_dns1123(plain):
        return plain
    # Rewrite what DNS-1123 forbids, then make room for a hash of the *original* pair.
    cleaned = re.sub(r"[^a-z0-9-]+", "-", sid).strip("-") or "x"
    suffix = f"-v{ver}-h{_digest(f'{sid}@{ver}')}"
    room = MAX_NAME - len(PREFIX) - 1 - len(suffix)
    cleaned = cleaned[:room].rstrip("-") or "x"
    name = f"{PREFIX}-{cleaned}{suffix}"
    assert is_dns1123(name), name
    return name


def label_value(value: object) -> str:
    """A Kubernetes label value (<= 63 chars, `[A-Za-z0-9._-]`, alphanumeric ends); hashed if not."""
    text = str(value)
    if len(text) <= MAX_NAME and _LABEL_VALUE.match(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    suffix = "-h" + _digest(text)
    cleaned = cleaned[: MAX_NAME - len(suffix)].rstrip("-._")
    return (cleaned + suffix) if cleaned else suffix.lstrip("-")
