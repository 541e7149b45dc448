"""`customscripts status`: the local stack's services, each component's health (its ops listener's /healthz
and /readyz) and the key figures read from the components' /metrics (customscripts/metrics.py).

Components are found the way an operator's Prometheus finds pods: the provider names each running
function's ops port in its FunctionStatus (`com.customscripts.local.metrics-port`); the scheduler serves on
its metrics port. A function scaled to zero has no process and so no figures until its next call.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from customscripts.config import Settings, settings
from customscripts.faas.naming import METRICS_PORT_ANNOTATION
from customscripts.local import stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str, timeout: float = 3.0) -> Samples:
    """Every sample of `base_url`/metrics: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= set(lab))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """`name`'s samples summed per value of `label`."""
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        if n == name:
            key = dict(lab).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def probe(base_url: str, path: str, timeout: float = 3.0) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of an ops route; (0, {"error": ...}) when nothing answers."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}{path}", timeout=timeout) as reply:
            status, data = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    except OSError as exc:
        return 0, {"error": str(getattr(exc, "reason", None) or exc)}
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        body = {}
    return status, body if isinstance(body, dict) else {}


def function_ops_urls(cfg: Settings) -> dict[str, str | None]:
    """Each deployed function's ops listener (None: no process now, e.g. scaled to zero)."""
    from customscripts.faas.client import OpenFaaSClient

    with OpenFaaSClient(cfg.provider_url) as client:
        listed = client.list()
    out: dict[str, str | None] = {}
    for fn in listed:
        port = (fn.get("annotations") or {}).get(METRICS_PORT_ANNOTATION)
        out[fn["name"]] = f"http://{cfg.provider_host}:{port}" if port else None
    return out


def components(cfg: Settings) -> dict[str, str | None]:
    """Component name (a function's own name for functions) -> its ops base URL (None: not running)."""
    found: dict[str, str | None] = {"provider": cfg.provider_url}
    with contextlib.suppress(Exception):  # the provider is down: said by its own line
        found.update(function_ops_urls(cfg))
    if stack.running_pid(cfg, "scheduler") is not None:
        found["scheduler"] = f"http://127.0.0.1:{stack.scheduler_port(cfg)}"
    return found


def report(cfg: Settings | None = None) -> dict[str, Any]:
    """Services, components (live, ready, their checks) and the key figures."""
    cfg = cfg or settings()
    out: dict[str, Any] = {"services": stack.status(cfg), "components": {}, "figures": {}}
    scraped: dict[str, Samples] = {}
    for name, url in components(cfg).items():
        if url is None:
            out["components"][name] = {"state": "idle", "detail": "no process (scaled to zero; starts on its next "
                                                                   "call)"}
            continue
        live, _ = probe(url, "/healthz")
        ready, body = probe(url, "/readyz")
        if live != 200:
            out["components"][name] = {"state": "down", "url": url,
                                       "detail": f"{url} does not answer: {body.get('error', live)}"}
            continue
        state = "ready" if ready == 200 else "not ready"
        out["components"][name] = {"state": state, "url": url, "checks": body.get("checks", {})}
        try:
            scraped[name] = scrape(url)
        except (OSError, ValueError) as exc:
            out["components"][name] = {"state": "down", "url": url, "detail": f"/metrics: {exc}"}
    out["figures"] = figures(scraped)
    return out


def figures(scraped: Mapping[str, Samples]) -> dict[str, Any]:
    """The key figures over every component scraped (each process counts since it started)."""
    def summed(name: str, label: str) -> dict[str, float]:
        acc: dict[str, float] = {}
        for samples in scraped.values():
            for key, v in by_label(samples, name, label).items():
                acc[key] = acc.get(key, 0.0) + v
        return {k: v for k, v in sorted(acc.items()) if v}

    def one(name: str, **labels: str) -> float:
        return sum(total(s, name, **labels) for s in scraped.values())

    gateway = scraped.get("gateway-fn", {})
    reads = sum(v for (n, lab), v in gateway.items()
                if n == "cs_http_requests_total" and dict(lab).get("route", "").startswith("/data/"))
    out: dict[str, Any] = {
        "executes by status": summed("cs_executions_total", "status"),
        "script function executions by status": summed("cs_function_executions_total", "status"),
        "gateway reads": reads,
        "gateway rate-limit refusals": one("cs_gateway_rate_limited_total"),
        "realtime evaluations by status": summed("cs_realtime_evaluations_total", "status"),
        "dead letters": one("cs_realtime_dead_letters_total"),
        "deployed functions": summed("cs_provider_functions_deployed", "kind"),
        "running functions": summed("cs_provider_functions_running", "kind"),
        "cold starts": one("cs_provider_cold_starts_total"),
        "budget evictions": one("cs_budget_evictions_total"),
    }
    if "scheduler" in scraped:
        out["queue pending"] = one("cs_realtime_consumer_pending")
        out["queue ack pending"] = one("cs_realtime_consumer_ack_pending")
    return out


def render(rep: Mapping[str, Any]) -> str:
    """The report for people: one line per service and component, then the figures."""
    lines = ["services:"]
    for name, svc in rep["services"].items():
        state = "up" if svc["healthy"] else "DOWN"
        lines.append(f"  {name:<12} {state:<10} port {svc['port']}" + (f" pid {svc['pid']}" if svc["pid"] else ""))
    lines.append("components:")
    width = max([12, *(len(name) for name in rep["components"])])
    for name, comp in rep["components"].items():
        state = comp["state"]
        detail = comp.get("detail") or ", ".join(f"{k} {v}" for k, v in (comp.get("checks") or {}).items())
        shown = state.upper() if state in ("down", "not ready") else state
        lines.append(f"  {name:<{width}} {shown:<10} {detail}")
    lines.append("figures (since each process started):")
    for key, value in rep["figures"].items():
        shown = (", ".join(f"{k} {v:g}" for k, v in value.items()) or "none") if isinstance(value, dict) \
            else f"{value:g}"
        lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def healthy(rep: Mapping[str, Any]) -> bool:
    return all(s["healthy"] for s in rep["services"].values()) and all(
        c["state"] in ("ready", "idle") for c in rep["components"].values())
