"""Prometheus metrics of every component, defined once, and the one way to serve them with health routes.

Each process is one component (registry-fn, gateway-fn, a script function, the scheduler, the local
provider) and serves its own `/metrics`, `/healthz` (liveness: the process answers) and `/readyz`
(readiness: the component's dependencies answer) on an *ops listener* of its own, never on the port
callers reach: a function's public port is behind the OpenFaaS gateway at /function/<name>/..., and
whatever path a caller adds there reaches only the handler, which serves no metrics. Functions listen on
CS_FN_METRICS_ADDR:CS_FN_METRICS_PORT (0.0.0.0:9464 in a pod, scraped through the pod's
`prometheus.io/*` annotations; the local provider gives each function process a loopback port of its own
and names it in the FunctionStatus), the scheduler on CS_SCHEDULER_METRICS_PORT, the provider on its own
port (a local stand-in for the OpenFaaS gateway, which serves its own metrics too).

Labels are bounded: status, tier, reason, route template, component, HTTP code. Never a user, tenant,
script, function name, params or source: one process's numbers are tenant-free, and which function a
script-function process serves is known only from the scrape target (its pod), never from a label.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

COMPONENTS = ("registry-fn", "gateway-fn", "script-function", "scheduler", "provider")
# the execution statuses (sandbox/results.py STATUSES) and the registry's refusals before anything ran
EXECUTE_STATUSES = ("ok", "error", "timeout", "invalid_output", "dependency_failed", "denied", "throttled")
OTHER = "other"  # any value outside a label's known set (a tier the table does not know, ...)

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MEMORY_BYTES = tuple(mb * 1024 * 1024 for mb in (8, 16, 32, 64, 128, 256, 512, 1024, 2048))
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --------------------------------------------------------------------------- every component

COMPONENT_UP = Gauge("cs_component_up", "1 while this process serves, by the component it is", ["component"])
COMPONENT_READY = Gauge("cs_component_ready", "1 when the component's dependencies answered its last "
                        "readiness check (run at each scrape, at most every few seconds)", ["component"])
HTTP_REQUESTS = Counter("cs_http_requests_total", "Requests routed by the component's API, by route template "
                        "and HTTP status", ["component", "route", "code"])
HTTP_SECONDS = Histogram("cs_http_request_duration_seconds", "Time inside the component's route handler",
                         ["component", "route"], buckets=SECONDS)

# --------------------------------------------------------------------------- registry-fn: one-time executes

EXECUTIONS = Counter("cs_executions_total", "One-time executes by status (throttled and denied included) and "
                     "the caller's tier", ["status", "tier"])
EXECUTION_SECONDS = Histogram("cs_execution_duration_seconds", "Wall time of a one-time execute's run as the "
                              "function's supervisor measured it", ["status", "tier"], buckets=SECONDS)
EXECUTION_CPU_SECONDS = Histogram("cs_execution_cpu_seconds", "CPU time of a one-time execute's sandboxed child, "
                                  "measured by the supervisor (wait4/procfs)", ["tier"], buckets=SECONDS)
EXECUTION_MEMORY_BYTES = Histogram("cs_execution_memory_bytes", "Peak memory of a one-time execute's sandboxed "
                                   "child, measured by the supervisor", ["tier"], buckets=MEMORY_BYTES)

# --------------------------------------------------------------------------- a script function's supervisor

FUNCTION_EXECUTIONS = Counter("cs_function_executions_total", "Executions this function's supervisor ran, by "
                              "status and request kind (execute: one; batch: realtime and series items)",
                              ["status", "kind"])
FUNCTION_SECONDS = Histogram("cs_function_execution_seconds", "Wall time of one execution in the sandbox, "
                             "measured by the supervisor", ["status"], buckets=SECONDS)
FUNCTION_CPU_SECONDS = Histogram("cs_function_cpu_seconds", "CPU time of one execution, measured by the "
                                 "supervisor, never the script's own report", buckets=SECONDS)
FUNCTION_MEMORY_BYTES = Histogram("cs_function_memory_bytes", "Peak memory of the child that ran an execution, "
                                  "measured by the supervisor", buckets=MEMORY_BYTES)
FUNCTION_REQUESTS = Counter("cs_function_requests_total", "Requests to the function by kind (invocation, "
                            "function_url) and HTTP status", ["kind", "code"])

# --------------------------------------------------------------------------- gateway-fn

GATEWAY_RATE_LIMITED = Counter("cs_gateway_rate_limited_total", "Data reads refused by the rate limiter (429), "
                               "by the kind of execution (onetime, realtime)", ["source"])

# --------------------------------------------------------------------------- function budget and provider

BUDGET_DEPLOYS = Counter("cs_budget_deploys_total", "Script functions the budget deployed on demand "
                         "(a version that was not deployed)")
BUDGET_EVICTIONS = Counter("cs_budget_evictions_total", "Script functions the budget deleted to make room, "
                           "by reason (lru: idle, least recently used; untracked: deployed outside the slots)",
                           ["reason"])
BUDGET_DEPLOYED = Gauge("cs_budget_functions_deployed", "Script functions deployed at the gateway when the "
                        "budget last looked")
PROVIDER_COLD_STARTS = Counter("cs_provider_cold_starts_total", "Function processes the local provider "
                               "started, by kind (platform, script)", ["kind"])
PROVIDER_COLD_START_SECONDS = Histogram("cs_provider_cold_start_seconds", "Function process start until it "
                                        "listens", ["kind"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PROVIDER_IDLE_STOPS = Counter("cs_provider_idle_stops_total", "Function processes stopped after their idle time "
                              "(scale to zero)", ["kind"])
PROVIDER_INVOCATIONS = Counter("cs_provider_invocations_total", "Calls through /function/ and "
                               "/async-function/, by kind and HTTP status", ["kind", "code"])

PROVIDER_DEPLOYED = "cs_provider_functions_deployed"  # gauges of ProviderCollector, by kind
PROVIDER_RUNNING = "cs_provider_functions_running"

# --------------------------------------------------------------------------- realtime scheduler
# (names kept from customscripts/realtime/metrics.py, which re-exports them)

EVALUATIONS = Counter("cs_realtime_evaluations_total", "Realtime evaluations by status", ["status"])
RETRIES = Counter("cs_realtime_batch_retries_total", "Event batches left unacknowledged for redelivery because "
                  "publishing (PostgreSQL, Redis) failed")
ITEM_RETRIES = Counter("cs_realtime_item_retries_total", "Evaluations tried again in their batch, by why the last "
                       "attempt failed", ["reason"])
DEAD_LETTERS = Counter("cs_realtime_dead_letters_total", "Evaluations dead-lettered (recorded, not published; their "
                       "events acknowledged), by reason", ["reason"])
BREAKER_OPENED = Counter("cs_realtime_breaker_opened_total", "Circuit breakers of a function and tenant opened")
REALTIME_LATENCY = Histogram("cs_realtime_event_to_published_seconds", "Event entering JetStream to output "
                             "published", buckets=LATENCY)
INVOKE_SECONDS = Histogram("cs_realtime_invoke_seconds", "One batched function invocation",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
QUEUED = Histogram("cs_realtime_event_queued_seconds", "Event entering JetStream to its batch starting "
                   "(the queueing part of event-to-published)", buckets=LATENCY)
PREFETCHED_READS = Counter("cs_realtime_prefetched_reads_total", "Script reads answered from data sent along with "
                           "the batch instead of gateway-fn")
BATCH_ITEMS = Histogram("cs_realtime_batch_items", "Items per batched invocation",
                        buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000))
# sampled from the NATS monitoring endpoint at scrape time by ConsumerCollector, never in the event loop
CONSUMER_PENDING = "cs_realtime_consumer_pending"
CONSUMER_ACK_PENDING = "cs_realtime_consumer_ack_pending"

_state: dict[str, Any] = {"component": OTHER}


def component() -> str:
    """The component this process serves as (set by `serve`)."""
    return str(_state["component"])


def bounded(value: Any, known: Iterable[str]) -> str:
    """`value` as a label when it is one of `known`, else `other`: no caller can grow a label's values."""
    text = str(value)
    return text if text in known else OTHER


def _tiers() -> Mapping[str, Any]:
    from customscripts.config import settings

    return settings().tiers


def observe_execute(tier: str, status: Any = None, duration_ms: Any = None, cpu_ms: Any = None,
                    memory_mb: Any = None, **_: Any) -> None:
    """One one-time execute attempt (every audited one: ran, denied, throttled). The usage figures are the
    supervisor's measurement carried in the function's answer; a refusal has none."""
    tier = bounded(tier, _tiers())
    status = bounded(status, EXECUTE_STATUSES)
    EXECUTIONS.labels(status, tier).inc()
    if isinstance(duration_ms, int | float):
        EXECUTION_SECONDS.labels(status, tier).observe(duration_ms / 1000)
    if isinstance(cpu_ms, int | float):
        EXECUTION_CPU_SECONDS.labels(tier).observe(cpu_ms / 1000)
    if isinstance(memory_mb, int | float):
        EXECUTION_MEMORY_BYTES.labels(tier).observe(memory_mb * 1024 * 1024)


def observe_function_results(results: Iterable[Any], kind: str) -> None:
    """What a script function's supervisor ran (ExecutionResult objects: its own measurement)."""
    for result in results:
        status = bounded(result.status, EXECUTE_STATUSES)
        FUNCTION_EXECUTIONS.labels(status, kind).inc()
        FUNCTION_SECONDS.labels(status).observe(result.duration_ms / 1000)
        FUNCTION_CPU_SECONDS.observe(result.cpu_ms / 1000)
        FUNCTION_MEMORY_BYTES.observe(result.memory_mb * 1024 * 1024)


def observe_request(route: str, status: int, seconds: float) -> None:
    """One request a component's Router answered (route: the template it matched, bounded)."""
    HTTP_REQUESTS.labels(component(), route, str(int(status))).inc()
    HTTP_SECONDS.labels(component(), route).observe(seconds)


# --------------------------------------------------------------------------- readiness

Check = Callable[[], None]  # raises when the dependency does not answer


def _tcp(host: str, port: int, timeout: float = 2.0) -> None:
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def check_postgres(dsn: str | None = None) -> Check:
    def check() -> None:
        import psycopg

        from customscripts.config import settings

        with psycopg.connect(dsn or settings().pg_dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")

    return check


def check_redis() -> Check:
    def check() -> None:
        import redis

        from customscripts.config import settings

        cfg = settings()
        client = redis.Redis(host=cfg.redis_host, port=cfg.redis_port, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()

    return check


def check_nats() -> Check:
    def check() -> None:
        from customscripts.config import settings

        cfg = settings()
        with socket.create_connection((cfg.nats_host, cfg.nats_port), timeout=2) as sock:
            sock.settimeout(2)
            if not sock.recv(4).startswith(b"INFO"):
                raise ConnectionError("NATS did not greet")

    return check


def check_url(url: str) -> Check:
    """The service at `url` accepts connections (a TCP connect: nothing is asked of it)."""
    def check() -> None:
        parts = urlsplit(url)
        _tcp(parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80))

    return check


def dependency_checks(*names: str) -> dict[str, Check]:
    """The standard checks by name: postgres, postgres-reader, redis, nats, gateway-fn."""
    from customscripts.config import settings

    known: dict[str, Callable[[], Check]] = {
        "postgres": check_postgres,
        "postgres-reader": lambda: check_postgres(settings().pg_reader_dsn),
        "redis": check_redis,
        "nats": check_nats,
        "gateway-fn": lambda: check_url(settings().data_gateway_url),
    }
    return {name: known[name]() for name in names}


class Health:
    """A component's liveness and readiness: readiness runs every check (each bounded by its own timeout)
    and is cached for `cache_s`, so probes and scrapes together cost at most one round per interval."""

    def __init__(self, name: str, checks: Mapping[str, Check] | None = None, cache_s: float = 2.0) -> None:
        self.component = name
        self.checks = dict(checks or {})
        self.cache_s = cache_s
        self._last: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def readiness(self) -> dict[str, Any]:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self.cache_s:
                return self._last[1]
            results: dict[str, str] = {}
            for name, check in self.checks.items():
                try:
                    check()
                    results[name] = "ok"
                except Exception as exc:  # any failure of a dependency is "not ready", named
                    results[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            ready = all(v == "ok" for v in results.values())
            report = {"status": "ok" if ready else "unavailable", "component": self.component, "checks": results}
            COMPONENT_READY.labels(self.component).set(1 if ready else 0)
            self._last = (time.monotonic(), report)
            return report


class _ReadinessCollector(Collector):
    """Refreshes cs_component_ready at scrape time (the gauge itself is exported by the default registry)."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterable[Any]:
        self.health.readiness()
        return []


def render() -> tuple[str, bytes]:
    """The process's metrics in the Prometheus text format: (content type, body)."""
    return CONTENT_TYPE_LATEST, generate_latest(REGISTRY)


def ops_response(health: Health, method: str, target: str) -> tuple[int, list[tuple[str, str]], bytes] | None:
    """The answer to an ops route (/metrics, /healthz, /readyz), or None when `target` is none of them."""
    path = target.split("?", 1)[0]
    if path not in ("/metrics", "/healthz", "/readyz"):
        return None
    if method not in ("GET", "HEAD"):
        return 405, [("Content-Type", "application/json"), ("Allow", "GET, HEAD")], json.dumps(
            {"error": {"code": "method_not_allowed", "message": f"{method} not allowed on {path}"}}).encode()
    if path == "/metrics":
        content_type, body = render()
        return 200, [("Content-Type", content_type)], body
    if path == "/healthz":
        report: dict[str, Any] = {"status": "ok", "component": health.component}
    else:
        report = health.readiness()
    status = 200 if report["status"] == "ok" else 503
    return status, [("Content-Type", "application/json")], json.dumps(report).encode()


class OpsServer:
    """The ops listener of one process: /metrics, /healthz, /readyz on the platform's HandlerServer."""

    def __init__(self, health: Health, port: int, addr: str = "127.0.0.1") -> None:
        from customscripts.http import HandlerServer

        self.health = health

        def raw(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Any:
            answer = ops_response(health, method, target)
            if answer is None:
                return 404, [("Content-Type", "application/json")], json.dumps(
                    {"error": {"code": "no_route", "message": "ops routes: /metrics, /healthz, /readyz"}}).encode()
            return answer

        self.server = HandlerServer(raw, addr, port, threads=4, name="ops")
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve_forever, name="ops-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.close()


def register(name: str, checks: Mapping[str, Check] | None = None) -> Health:
    """Mark this process as `name` (cs_component_up) and keep its readiness fresh at every scrape."""
    from customscripts import http

    _state["component"] = name
    http.request_observer = observe_request  # every Router of this process counts its requests
    health = Health(name, checks)
    COMPONENT_UP.labels(name).set(1)
    previous = _state.get("collector")
    if previous is not None:
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(previous)
    collector = _ReadinessCollector(health)
    REGISTRY.register(collector)
    _state["collector"] = collector
    return health


def serve(name: str, port: int, addr: str = "127.0.0.1", checks: Mapping[str, Check] | None = None) -> OpsServer:
    """Register this process as component `name` and serve its ops routes on addr:port (0: any free port)."""
    return OpsServer(register(name, checks), port, addr)


# --------------------------------------------------------------------------- realtime queue depth


class ConsumerCollector(Collector):
    """The scheduler's JetStream consumer backlog, read from the NATS monitoring endpoint (/jsz) when
    Prometheus scrapes (cached `cache_s`): messages not yet delivered (num_pending) and delivered but not
    acknowledged (num_ack_pending). Nothing of it runs in the scheduler's event loop."""

    def __init__(self, monitor_url: str, stream: str, durable: str, cache_s: float = 2.0) -> None:
        self.url = f"{monitor_url.rstrip('/')}/jsz?accounts=true&streams=true&consumers=true"
        self.stream, self.durable, self.cache_s = stream, durable, cache_s
        self._last: tuple[float, tuple[float, float] | None] = (-1e9, None)

    def sample(self) -> tuple[float, float] | None:
        import urllib.request

        if time.monotonic() - self._last[0] < self.cache_s:
            return self._last[1]
        value = None
        try:
            with urllib.request.urlopen(self.url, timeout=2) as reply:
                data = json.loads(reply.read())
            for account in data.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if stream.get("name") != self.stream:
                        continue
                    for consumer in stream.get("consumer_detail") or []:
                        if consumer.get("name") == self.durable:
                            value = (float(consumer.get("num_pending") or 0),
                                     float(consumer.get("num_ack_pending") or 0))
        except (OSError, ValueError):
            value = None
        if value is not None:  # a consumer not there yet is looked for again at the next scrape
            self._last = (time.monotonic(), value)
        return value

    def collect(self) -> Iterable[Any]:
        sample = self.sample()
        if sample is None:
            return []
        pending = GaugeMetricFamily(CONSUMER_PENDING, "Market events on the stream not yet delivered to the "
                                    "scheduler's durable consumer (num_pending)")
        pending.add_metric([], sample[0])
        ack = GaugeMetricFamily(CONSUMER_ACK_PENDING, "Market events delivered to scheduler replicas and not yet "
                                "acknowledged (num_ack_pending)")
        ack.add_metric([], sample[1])
        return [pending, ack]


def watch_consumer(monitor_url: str, stream: str, durable: str) -> ConsumerCollector:
    """Export the consumer's backlog gauges from this process (once per process)."""
    existing = _state.get("consumer")
    if existing is not None:
        return existing
    collector = ConsumerCollector(monitor_url, stream, durable)
    REGISTRY.register(collector)
    _state["consumer"] = collector
    return collector


class ProviderCollector(Collector):
    """The local provider's deployed and running functions by kind, read at scrape time."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    def collect(self) -> Iterable[Any]:
        counts = self.provider.counts()
        deployed = GaugeMetricFamily(PROVIDER_DEPLOYED, "Functions deployed at the local provider, by kind",
                                     labels=["kind"])
        running = GaugeMetricFamily(PROVIDER_RUNNING, "Function processes running (not scaled to zero), by kind",
                                    labels=["kind"])
        for kind, n in counts["deployed"].items():
            deployed.add_metric([kind], n)
        for kind, n in counts["running"].items():
            running.add_metric([kind], n)
        return [deployed, running]


def watch_provider(provider: Any) -> None:
    """Export `provider`'s function gauges (the last provider started in this process)."""
    existing = _state.get("provider")
    if existing is not None:
        existing.provider = provider
        return
    collector = ProviderCollector(provider)
    REGISTRY.register(collector)
    _state["provider"] = collector


def defined_names() -> set[str]:
    """Every metric name this package exports, as Prometheus sees it (counters with _total, histograms'
    _bucket/_sum/_count): what dashboards and alert rules may reference."""
    names = {CONSUMER_PENDING, CONSUMER_ACK_PENDING, PROVIDER_DEPLOYED, PROVIDER_RUNNING}
    for value in globals().values():
        if isinstance(value, Counter | Gauge | Histogram):
            base = value._name
            if isinstance(value, Counter):
                names.add(f"{base}_total")
            elif isinstance(value, Histogram):
                names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
            else:
                names.add(base)
    return names
