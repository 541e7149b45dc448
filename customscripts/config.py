"""All configuration, read from environment variables with local-stack defaults.

Every tunable of the platform lives here so that production (OpenFaaS, MinIO, TimescaleDB,
NATS JetStream) and the local stack differ only in environment, never in code.

Why one module: configuration comes from one place (the house rule), so an operator reads every
setting, its variable and its default in one file; it is a flat list of fields, not logic.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

CUSTOM_SCRIPTS_FEATURE = "custom_scripts"
MARKETPLACE_PUBLISH_FEATURE = "marketplace_publish"  # needed to list a script on the marketplace


DEFAULT_EXECUTES_PER_USER = 4
DEFAULT_EXECUTES_PER_TENANT = 8


@dataclass(frozen=True)
class Tier:
    """What a subscription tier may do; caps apply per user."""

    name: str
    features: frozenset[str]
    max_scripts: int
    timeout_ms: int
    memory_mb: int
    cpu_seconds: int
    rate_per_minute: int  # data-gateway reads per user per minute
    burst: int
    allowed_modules: frozenset[str]
    max_subscriptions: int
    function_memory: str  # OpenFaaS limits.memory for this tier's script functions
    function_cpu: str
    # Realtime evaluations read through their own bucket (execution tokens minted by the scheduler
    # carry `rt`): their volume is bounded by max_subscriptions x events, not by a person clicking.
    realtime_rate_per_minute: int = 0
    realtime_burst: int = 0
    # One-time executes in flight at once, per user and per tenant (the caller's tier sizes both),
    # across all registry-fn replicas (customscripts/registry/concurrency.py). The tenant's cap
    # stays below a replica's CS_EXECUTE_MAX_INFLIGHT so no single tenant can fill a replica.
    max_concurrent_executes_per_user: int = DEFAULT_EXECUTES_PER_USER
    max_concurrent_executes_per_tenant: int = DEFAULT_EXECUTES_PER_TENANT
    # History (customscripts/series.py): bars one series request evaluates (a longer range is paged:
    # `next_start`), and the outputs a new subscription is backfilled with (default and most).
    max_series_bars: int = 0
    default_backfill: int = 0
    max_backfill: int = 0


BASE_MODULES = frozenset(
    {
        "math",
        "cmath",
        "statistics",
        "datetime",
        "decimal",
        "fractions",
        "itertools",
        "functools",
        "collections",
        "operator",
        "bisect",
        "heapq",
        "random",
        "re",
        "json",
        "typing",
        "dataclasses",
        "enum",
        "numpy",
        "pandas",  # disarmed: no file, network or eval access (sandbox/pandas_guard.py)
    }
)

DEFAULT_TIERS: dict[str, dict] = {
    "free": {
        "features": [],
        "max_scripts": 0,
        "timeout_ms": 1000,
        "memory_mb": 256,
        "cpu_seconds": 1,
        "rate_per_minute": 60,
        "burst": 20,
        "allowed_modules": sorted(BASE_MODULES),
        "max_subscriptions": 0,
        "function_memory": "128Mi",
        "function_cpu": "100m",
        "realtime_rate_per_minute": 0,
        "realtime_burst": 0,
        "max_concurrent_executes_per_user": 0,
        "max_concurrent_executes_per_tenant": 0,
        "max_series_bars": 0,
        "default_backfill": 0,
        "max_backfill": 0,
    },
    "pro": {
        "features": [CUSTOM_SCRIPTS_FEATURE],
        "max_scripts": 50,
        "timeout_ms": 2000,
        "memory_mb": 512,
        "cpu_seconds": 2,
        "rate_per_minute": 6000,
        "burst": 600,
        "allowed_modules": sorted(BASE_MODULES),
        "max_subscriptions": 2000,
        "function_memory": "256Mi",
        "function_cpu": "500m",
        "realtime_rate_per_minute": 1_200_000,
        "realtime_burst": 60_000,
        "max_concurrent_executes_per_user": 4,
        "max_concurrent_executes_per_tenant": 8,
        "max_series_bars": 5000,
        "default_backfill": 200,
        "max_backfill": 1000,
    },
    "enterprise": {
        "features": [CUSTOM_SCRIPTS_FEATURE, MARKETPLACE_PUBLISH_FEATURE],
        "max_scripts": 1000,
        "timeout_ms": 5000,
        "memory_mb": 1024,
        "cpu_seconds": 5,
        "rate_per_minute": 60000,
        "burst": 6000,
        "allowed_modules": sorted(BASE_MODULES),
        "max_subscriptions": 20000,
        "function_memory": "512Mi",
        "function_cpu": "1000m",
        "realtime_rate_per_minute": 6_000_000,
        "realtime_burst": 300_000,
        "max_concurrent_executes_per_user": 8,
        "max_concurrent_executes_per_tenant": 16,
        "max_series_bars": 20000,
        "default_backfill": 500,
        "max_backfill": 5000,
    },
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _load_tiers() -> dict[str, Tier]:
    raw = os.environ.get("CS_TIERS_JSON")
    table = json.loads(raw) if raw else DEFAULT_TIERS
    return {
        name: Tier(
            name=name,
            features=frozenset(spec.get("features", [])),
            max_scripts=int(spec["max_scripts"]),
            timeout_ms=int(spec["timeout_ms"]),
            memory_mb=int(spec["memory_mb"]),
            cpu_seconds=int(spec["cpu_seconds"]),
            rate_per_minute=int(spec["rate_per_minute"]),
            burst=int(spec["burst"]),
            allowed_modules=frozenset(spec.get("allowed_modules", BASE_MODULES)),
            max_subscriptions=int(spec.get("max_subscriptions", 0)),
            function_memory=str(spec.get("function_memory", "256Mi")),
            function_cpu=str(spec.get("function_cpu", "500m")),
            realtime_rate_per_minute=int(spec.get("realtime_rate_per_minute", 0)),
            realtime_burst=int(spec.get("realtime_burst", 0)),
            max_concurrent_executes_per_user=int(spec.get("max_concurrent_executes_per_user",
                                                          DEFAULT_EXECUTES_PER_USER)),
            max_concurrent_executes_per_tenant=int(spec.get("max_concurrent_executes_per_tenant",
                                                            DEFAULT_EXECUTES_PER_TENANT)),
            max_series_bars=int(spec.get("max_series_bars", 0)),
            default_backfill=int(spec.get("default_backfill", 0)),
            max_backfill=int(spec.get("max_backfill", 0)),
        )
        for name, spec in table.items()
    }


def _state_dir() -> Path:
    return Path(_env("CS_STATE_DIR", str(REPO_ROOT / ".state")))


@dataclass(frozen=True)
class Settings:
    state_dir: Path = field(default_factory=_state_dir)

    # PostgreSQL / TimescaleDB
    pg_host: str = field(default_factory=lambda: _env("CS_PG_HOST", "127.0.0.1"))
    pg_port: int = field(default_factory=lambda: _env_int("CS_PG_PORT", 54329))
    pg_db: str = field(default_factory=lambda: _env("CS_PG_DB", "customscripts"))
    pg_user: str = field(default_factory=lambda: _env("CS_PG_USER", "customscripts"))
    pg_password: str = field(default_factory=lambda: secret("pg-password", "CS_PG_PASSWORD", "customscripts-local"))
    pg_reader_user: str = field(default_factory=lambda: _env("CS_PG_READER_USER", "customscripts_reader"))
    pg_reader_password: str = field(
        default_factory=lambda: secret("pg-reader-password", "CS_PG_READER_PASSWORD", "reader-local")
    )
    # How long a request waits for a database connection before it fails (503), and how long a pool
    # retries a lost connection on its own (with backoff) before the next request that needs one tries
    # afresh: PostgreSQL coming back is noticed at once, not after a backoff grown over the outage.
    pg_wait_s: float = field(default_factory=lambda: _env_float("CS_PG_WAIT_S", 5.0))

    # Redis
    redis_host: str = field(default_factory=lambda: _env("CS_REDIS_HOST", "127.0.0.1"))
    redis_port: int = field(default_factory=lambda: _env_int("CS_REDIS_PORT", 63799))

    # NATS JetStream
    nats_host: str = field(default_factory=lambda: _env("CS_NATS_HOST", "127.0.0.1"))
    nats_port: int = field(default_factory=lambda: _env_int("CS_NATS_PORT", 42229))
    nats_monitor_port: int = field(default_factory=lambda: _env_int("CS_NATS_MONITOR_PORT", 42230))
    nats_stream: str = field(default_factory=lambda: _env("CS_NATS_STREAM", "MARKET"))
    nats_subject_prefix: str = field(default_factory=lambda: _env("CS_NATS_SUBJECT_PREFIX", "market.candle"))

    # S3 / MinIO
    s3_endpoint: str = field(default_factory=lambda: _env("CS_S3_ENDPOINT", "127.0.0.1:18333"))
    s3_access_key: str = field(default_factory=lambda: secret("s3-access-key", "CS_S3_ACCESS_KEY", "customscripts"))
    s3_secret_key: str = field(
        default_factory=lambda: secret("s3-secret-key", "CS_S3_SECRET_KEY", "customscripts-local-secret")
    )
    s3_bucket: str = field(default_factory=lambda: _env("CS_S3_BUCKET", "customscripts"))
    s3_secure: bool = field(default_factory=lambda: _env("CS_S3_SECURE", "0") == "1")

    # Secrets (production reads them from /var/openfaas/secrets/, see secret())
    jwt_secret: str = field(
        default_factory=lambda: secret("jwt-secret", "CS_JWT_SECRET", "local-jwt-secret-change-me-in-production")
    )
    jwt_algorithm: str = field(default_factory=lambda: _env("CS_JWT_ALGORITHM", "HS256"))
    invocation_secret: str = field(
        default_factory=lambda: secret("invocation-secret", "CS_INVOCATION_SECRET",
                                       "local-invocation-secret-change-me-in-production")
    )
    execution_token_secret: str = field(
        default_factory=lambda: secret("execution-token-secret", "CS_EXECUTION_TOKEN_SECRET",
                                       "local-execution-secret-change-me-in-production")
    )
    invocation_token_ttl_s: int = field(default_factory=lambda: _env_int("CS_INVOCATION_TOKEN_TTL", 60))
    execution_token_ttl_s: int = field(default_factory=lambda: _env_int("CS_EXECUTION_TOKEN_TTL", 120))

    # Platform HTTP endpoints (local defaults; on OpenFaaS these are /function/<name> URLs)
    provider_host: str = field(default_factory=lambda: _env("CS_PROVIDER_HOST", "127.0.0.1"))
    provider_port: int = field(default_factory=lambda: _env_int("CS_PROVIDER_PORT", 8080))
    openfaas_url: str = field(default_factory=lambda: _env("OPENFAAS_URL", ""))
    openfaas_user: str = field(default_factory=lambda: _env("CS_OPENFAAS_USER", "admin"))
    gateway_url: str = field(default_factory=lambda: _env("CS_GATEWAY_URL", ""))
    gateway_fn_port: int = field(default_factory=lambda: _env_int("CS_GATEWAY_FN_PORT", 8090))
    # registry-fn as gateway-fn reaches it for script functions' function-URL calls: on Kubernetes its
    # Service, http://registry-fn.openfaas-fn:8080; empty: through the gateway (registry_url)
    registry_service: str = field(default_factory=lambda: _env("CS_REGISTRY_URL", ""))
    # the OpenFaaS gateway as users reach it, for the function URLs the API shows; empty: provider_url
    public_gateway: str = field(default_factory=lambda: _env("CS_PUBLIC_GATEWAY_URL", ""))
    # Where platform callers invoke a function directly, skipping the gateway hop, e.g.
    # "http://{name}.openfaas-fn:8080" (its Service) on Kubernetes. Empty: the address the gateway
    # names in the function's status (the local provider does), else always through the gateway.
    function_url_template: str = field(default_factory=lambda: _env("CS_FUNCTION_URL_TEMPLATE", ""))

    # The CLI and customscripts.client: the public API's URL (empty: the local stack's registry-fn)
    # and the caller's bearer token, from CS_TOKEN or else the file CS_TOKEN_FILE.
    api_url: str = field(default_factory=lambda: _env("CS_API_URL", ""))
    api_token: str = field(default_factory=lambda: _env("CS_TOKEN", ""))
    api_token_file: str = field(default_factory=lambda: _env("CS_TOKEN_FILE", "~/.config/customscripts/token"))

    # Sandbox
    isolation_mode: str = field(default_factory=lambda: _env("CS_ISOLATION", "bwrap"))  # bwrap | process
    sandbox_prefork: int = field(default_factory=lambda: _env_int("CS_SANDBOX_PREFORK", 2))
    max_output_bytes: int = field(default_factory=lambda: _env_int("CS_MAX_OUTPUT_BYTES", 64 * 1024))
    max_log_bytes: int = field(default_factory=lambda: _env_int("CS_MAX_LOG_BYTES", 16 * 1024))
    tmp_size_mb: int = field(default_factory=lambda: _env_int("CS_SANDBOX_TMP_MB", 16))
    tmp_inodes: int = field(default_factory=lambda: _env_int("CS_SANDBOX_TMP_INODES", 1024))
    sandbox_py_guards: bool = field(default_factory=lambda: _env("CS_SANDBOX_PY_GUARDS", "1") != "0")  # tests only
    sandbox_max_batch: int = field(default_factory=lambda: _env_int("CS_SANDBOX_MAX_BATCH", 1000))
    # A series request (and a subscription's backfill) holds one execute lease of its caller for
    # at most this long (the lease expires on its own if the replica dies holding it).
    series_lease_s: float = field(default_factory=lambda: _env_float("CS_SERIES_LEASE_S", 600.0))
    sandbox_max_calls_per_item: int = field(default_factory=lambda: _env_int("CS_SANDBOX_MAX_CALLS_PER_ITEM", 1000))

    # Script function identity (set by the provider / deployment for each function)
    function_name: str = field(default_factory=lambda: _env("CS_FUNCTION_NAME", ""))
    function_sample_data: bool = field(default_factory=lambda: _env("CS_FUNCTION_SAMPLE_DATA", "0") == "1")

    # registry-fn: one-time executes (customscripts/registry/concurrency.py). A function process
    # serves CS_FN_THREADS requests at once (the local runner; stack.yml sets registry-fn's); at
    # most CS_EXECUTE_MAX_INFLIGHT of them may be executes waiting on a script function, so the
    # rest of the API always keeps the others. Default: three quarters of the threads.
    fn_threads: int = field(default_factory=lambda: _env_int("CS_FN_THREADS", 8))
    execute_max_inflight: int = field(default_factory=lambda: _env_int(
        "CS_EXECUTE_MAX_INFLIGHT", max(1, _env_int("CS_FN_THREADS", 8) * 3 // 4)))
    # An execute's concurrency lease lasts the version's wall timeout plus this: long enough for a
    # cold start and a short queue at the function, short enough that a crashed replica's leases
    # are back soon.
    execute_lease_slack_s: float = field(default_factory=lambda: _env_float("CS_EXECUTE_LEASE_SLACK_S", 30.0))
    # Answered means audited (registry/audit.py): an execute waits at most this long for its audit
    # row's durable commit, then answers 503 `audit_unavailable` instead (the database is down).
    audit_wait_s: float = field(default_factory=lambda: _env_float("CS_AUDIT_WAIT_S", 5.0))
    # "0": the previous behaviour, the row queued and the answer sent before its commit (a crash can
    # lose a few ms of rows). Only for bench/bench_execute.py's same-run comparison.
    audit_durable: bool = field(default_factory=lambda: _env("CS_AUDIT_DURABLE", "1") != "0")

    # CPU weight of one tenant's script functions together, locally (faas/cpugroups.py); 1024 is one
    # busy process's weight. Default: a whole machine's worth, so an idle machine is all a tenant's.
    tenant_cpu_shares: int = field(
        default_factory=lambda: _env_int("CS_TENANT_CPU_SHARES", 1024 * (os.cpu_count() or 1)))

    # Functions. At most `function_budget` script functions are deployed (OpenFaaS CE allows 15 in all).
    function_budget: int = field(default_factory=lambda: _env_int("CS_FUNCTION_BUDGET", 15))
    # How many of them one tenant may pin (live subscriptions, dependencies included) and hold
    # (recently executed) at once; 0: a third of the budget. See customscripts/faas/budget.py.
    function_tenant_share_setting: int = field(default_factory=lambda: _env_int("CS_FUNCTION_TENANT_SHARE", 0))
    function_idle_s: int = field(default_factory=lambda: _env_int("CS_FUNCTION_IDLE_S", 300))
    # How the local provider runs functions (local/provider.py): `process` (each from its build context,
    # in a venv of its own requirements) or `container` (each a container of its image, local/containers.py;
    # falls back to process, saying so, where no container engine can run).
    provider_runtime: str = field(default_factory=lambda: _env("CS_PROVIDER_RUNTIME", "process"))
    image_prefix: str = field(default_factory=lambda: _env("CS_IMAGE_PREFIX", "registry.local/customscripts"))
    # Build contexts (customscripts/faas/build.py): the templates every function is rendered from, and
    # where contexts are rendered. In registry-fn's image both sit next to the package copy
    # (function/templates via stack.yml `configuration.copy`); stack.yml points the contexts at /tmp.
    templates_dir: Path = field(default_factory=lambda: Path(_env("CS_TEMPLATES_DIR", str(REPO_ROOT / "templates"))))
    functions_dir: Path = field(default_factory=lambda: Path(_env("CS_FUNCTIONS_DIR", str(REPO_ROOT / "functions"))))

    # Images (customscripts/faas/images.py, builder.py): who builds a published version's image.
    # podman: locally, with the offline base image and the wheelhouse; kubernetes: a Job per version
    # (BuildKit rootless, deploy/k8s/base/builder/) pushing to CS_IMAGE_PREFIX; none: no images (the
    # process runtime needs none; publish stays as it was).
    builder: str = field(default_factory=lambda: _env("CS_BUILDER", "none"))  # podman | kubernetes | none
    # podman or docker; empty: podman when installed, else docker with a running daemon
    container_engine: str = field(default_factory=lambda: _env("CS_CONTAINER_ENGINE", ""))
    container_runtime: str = field(default_factory=lambda: _env("CS_CONTAINER_RUNTIME", "runc"))  # OCI runtime
    # a container's nofile/nproc rlimits, lowered to the host's hard limits (above them runc fails)
    container_nofile: int = field(default_factory=lambda: _env_int("CS_CONTAINER_NOFILE", 4096))
    container_nproc: int = field(default_factory=lambda: _env_int("CS_CONTAINER_NPROC", 1024))
    debian_mirror: str = field(default_factory=lambda: _env("CS_DEBIAN_MIRROR", ""))  # mmdebstrap's; empty: its default
    build_timeout_s: float = field(default_factory=lambda: _env_float("CS_BUILD_TIMEOUT_S", 1800.0))
    build_attempts: int = field(default_factory=lambda: _env_int("CS_BUILD_ATTEMPTS", 2))  # then `failed`
    build_retry_after_s: int = field(default_factory=lambda: _env_int("CS_BUILD_RETRY_AFTER_S", 10))
    # who drains the build queue: inline (a thread of the process that published, e.g. registry-fn
    # locally) or off (a dedicated `customscripts build --worker`: the Deployment on a cluster, whose
    # service account may create builder Jobs)
    build_worker: str = field(default_factory=lambda: _env("CS_BUILD_WORKER", "inline"))
    build_poll_s: float = field(default_factory=lambda: _env_float("CS_BUILD_POLL_S", 5.0))
    # Kubernetes builder: the API (empty: in-cluster, from the pod's service account), the namespace of
    # the builder Jobs and their template (deploy/k8s/base/builder/image-builder.yaml)
    k8s_api: str = field(default_factory=lambda: _env("CS_K8S_API", ""))
    k8s_token_file: str = field(default_factory=lambda: _env(
        "CS_K8S_TOKEN_FILE", "/var/run/secrets/kubernetes.io/serviceaccount/token"))
    k8s_ca_file: str = field(default_factory=lambda: _env(
        "CS_K8S_CA_FILE", "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"))
    build_namespace: str = field(default_factory=lambda: _env("CS_BUILD_NAMESPACE", "customscripts-build"))
    build_job_template: str = field(default_factory=lambda: _env("CS_BUILD_JOB_TEMPLATE", "image-builder"))

    # Realtime scheduler (customscripts.realtime.scheduler)
    scheduler_durable: str = field(default_factory=lambda: _env("CS_SCHEDULER_DURABLE", "cs-scheduler"))
    scheduler_fetch_batch: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_FETCH_BATCH", 500))
    # Batches a replica works on at once: the next batch's first dependency wave runs while the one
    # before it finishes its later waves and its publishing (each is acknowledged on its own, as two
    # replicas' batches are). 1: strictly one after another.
    scheduler_batches_in_flight: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_BATCHES_IN_FLIGHT", 2))
    # A free replica gives a batch this long from its first event to fill up (events published together,
    # e.g. one tick of many instruments, land in one batch, not in one per fetch).
    scheduler_fetch_wait_s: float = field(default_factory=lambda: _env_float("CS_SCHEDULER_FETCH_WAIT_S", 0.02))
    scheduler_ack_wait_s: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_ACK_WAIT_S", 30))
    scheduler_max_deliver: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_MAX_DELIVER", -1))
    scheduler_workers: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_WORKERS", 8))
    scheduler_max_items: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_MAX_ITEMS", 1000))
    scheduler_metrics_port: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_METRICS_PORT", 0))
    # where scheduler/main.py serves them: loopback locally, all interfaces in a pod (Prometheus scrapes it)
    scheduler_metrics_addr: str = field(default_factory=lambda: _env("CS_SCHEDULER_METRICS_ADDR", "127.0.0.1"))
    # Every function process's ops listener (/metrics, /healthz, /readyz; customscripts/metrics.py), never the
    # port callers reach through the gateway: 9464 on all interfaces in a pod (stack.yml and script
    # functions' deployments set both; Prometheus finds it by the pod's prometheus.io/* annotations). The
    # local provider gives each process a free loopback port instead (0) and names it in the FunctionStatus;
    # below 0: no ops listener.
    fn_metrics_port: int = field(default_factory=lambda: _env_int("CS_FN_METRICS_PORT", 0))
    fn_metrics_addr: str = field(default_factory=lambda: _env("CS_FN_METRICS_ADDR", "127.0.0.1"))
    # the port a function pod's ops listener has (what registry-fn gives every script function it deploys,
    # with the pod's prometheus.io/* annotations)
    pod_metrics_port: int = field(default_factory=lambda: _env_int("CS_POD_METRICS_PORT", 9464))
    scheduler_timer_subject: str = field(default_factory=lambda: _env("CS_SCHEDULER_TIMER_SUBJECT", "cs.timer"))
    scheduler_timers: str = field(default_factory=lambda: _env("CS_SCHEDULER_TIMERS", ""))  # e.g. "1m,1h"
    # Failures stay inside their function and tenant (customscripts/realtime/batchrun.py):
    # an evaluation whose invocation failed, or whose result the supervisor marked retryable, is tried
    # at most this many times in its batch, waiting backoff_s, doubled each time, up to backoff_max_s;
    # then it is dead-lettered and its events are acknowledged.
    scheduler_retry_attempts: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_RETRY_ATTEMPTS", 3))
    scheduler_retry_backoff_s: float = field(
        default_factory=lambda: _env_float("CS_SCHEDULER_RETRY_BACKOFF_S", 0.2))
    scheduler_retry_backoff_max_s: float = field(
        default_factory=lambda: _env_float("CS_SCHEDULER_RETRY_BACKOFF_MAX_S", 2.0))
    # An outage of the platform's data path the supervisor saw (by type: the data gateway or the database
    # behind it unavailable) is not the script's: it is retried, with the same backoff, until it has
    # lasted this long (a database restart fits) before it is dead-lettered.
    scheduler_outage_retry_s: float = field(
        default_factory=lambda: _env_float("CS_SCHEDULER_OUTAGE_RETRY_S", 30.0))
    # One invocation's deadline: this, or items x the version's item timeout + 5 s when that is less
    # (never less than one item's timeout + 5 s); chunks are sized to take about half of it from the
    # per-item time the function last took.
    scheduler_invoke_timeout_s: float = field(
        default_factory=lambda: _env_float("CS_SCHEDULER_INVOKE_TIMEOUT_S", 15.0))
    # Invocations of one script function in flight at once from a replica (across its batches). Its
    # supervisor runs one at a time, so more only queue there (and spend their deadline queueing);
    # raise it where functions run replicas.
    scheduler_function_inflight: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_FUNCTION_INFLIGHT", 1))
    # Circuit breaker per function and tenant: after this many consecutive timeouts or failed
    # invocations (or one invocation past its deadline) the function's items of that tenant are
    # dead-lettered without invoking it for the cool-down, doubled on each re-open up to the max.
    scheduler_breaker_strikes: int = field(default_factory=lambda: _env_int("CS_SCHEDULER_BREAKER_STRIKES", 3))
    scheduler_breaker_cooldown_s: float = field(
        default_factory=lambda: _env_float("CS_SCHEDULER_BREAKER_COOLDOWN_S", 10.0))
    scheduler_breaker_cooldown_max_s: float = field(
        default_factory=lambda: _env_float("CS_SCHEDULER_BREAKER_COOLDOWN_MAX_S", 300.0))
    # After SIGTERM a replica fetches nothing more and gives its batch under way this long to finish
    # (acknowledged); past it the batch's events are handed back (nak, redelivered to another replica
    # at once) and it exits: well inside Kubernetes' 30 s grace.
    scheduler_stop_grace_s: float = field(default_factory=lambda: _env_float("CS_SCHEDULER_STOP_GRACE_S", 10.0))

    tiers: dict[str, Tier] = field(default_factory=_load_tiers)

    @property
    def openfaas_password(self) -> str:
        """The gateway's basic-auth password (secret `basic-auth-password`): the OpenFaaS secret in
        production, locally the stack's own random one that `customscripts up` generates. Read when
        asked, so a process that loaded its settings before the first `up` still finds it. No default:
        without a password nothing opens `/system`."""
        return secret("basic-auth-password", "CS_OPENFAAS_PASSWORD", "", state_dir=self.state_dir)

    @property
    def function_tenant_share(self) -> int:
        """Function slots one tenant may pin or hold: CS_FUNCTION_TENANT_SHARE, else a third of the
        budget (at least 1, at most the budget), so no single tenant can take every slot."""
        share = self.function_tenant_share_setting or self.function_budget // 3
        return max(1, min(share, self.function_budget))

    @property
    def function_pin_limit(self) -> int:
        """Function slots all tenants together may pin: the budget less one tenant's share (unless the
        share is most of the budget), so one-time executes always find unpinned slots."""
        return max(self.function_tenant_share, self.function_budget - self.function_tenant_share)

    @property
    def pg_dsn(self) -> str:
        return (
            f"host={self.pg_host} port={self.pg_port} dbname={self.pg_db} "
            f"user={self.pg_user} password={self.pg_password}"
        )

    @property
    def pg_reader_dsn(self) -> str:
        return (
            f"host={self.pg_host} port={self.pg_port} dbname={self.pg_db} "
            f"user={self.pg_reader_user} password={self.pg_reader_password}"
        )

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/0"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.nats_host}:{self.nats_port}"

    @property
    def provider_url(self) -> str:
        return self.openfaas_url or f"http://{self.provider_host}:{self.provider_port}"

    @property
    def registry_url(self) -> str:
        """The public API: registry-fn behind the (local or OpenFaaS) gateway."""
        return f"{self.provider_url}/function/registry-fn"

    @property
    def public_gateway_url(self) -> str:
        """The OpenFaaS gateway as users reach it (function URLs): CS_PUBLIC_GATEWAY_URL, else provider_url."""
        return (self.public_gateway or self.provider_url).rstrip("/")

    @property
    def registry_service_url(self) -> str:
        return self.registry_service or self.registry_url

    @property
    def data_gateway_url(self) -> str:
        """Where script functions read data: gateway-fn's Service address, not the gateway (script
        functions may reach nothing else, deploy/k8s/base/networkpolicies/). On OpenFaaS set
        CS_GATEWAY_URL=http://gateway-fn.openfaas-fn:8080; locally the provider serves gateway-fn on
        gateway_fn_port as well as behind /function/gateway-fn."""
        return self.gateway_url or f"http://{self.provider_host}:{self.gateway_fn_port}"

    def tier(self, name: str) -> Tier | None:
        return self.tiers.get(name)

    def require(self, *names: str) -> None:
        """Fail now, naming each of these settings that production left unset (a service's start check)."""
        unset = self.__dict__.get("_unset_secrets") or {}
        missing = [unset[name] for name in names if name in unset]
        if missing:
            raise ProductionSettingsError("; ".join(missing))

    def __getattr__(self, name: str) -> Any:
        """Reached only for an absent attribute: a secret that production left unset (check_production)."""
        unset = self.__dict__.get("_unset_secrets") or {}
        if name in unset:
            raise ProductionSettingsError(unset[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


OPENFAAS_SECRETS_DIR = Path("/var/openfaas/secrets")
STACK_SECRETS_DIR = "secrets"  # under the state folder: the local stack's own secrets (local/stack.py)


def _secrets_folder() -> Path:
    """This process's secrets folder: CS_SECRETS_DIR (the local provider's per-function copy), else OpenFaaS'."""
    functions_dir = os.environ.get("CS_SECRETS_DIR")
    return Path(functions_dir) if functions_dir else OPENFAAS_SECRETS_DIR


def secret(name: str, env_name: str, default: str, *, state_dir: Path | None = None) -> str:
    """A secret, from the first of: the function's secrets folder (OpenFaaS mounts
    /var/openfaas/secrets/<name>; the local provider names its per-function copy in CS_SECRETS_DIR),
    the environment, the local stack's own `<state_dir>/secrets/<name>`, the default.

    The stack's file is for the stack's own processes (CLI, provider, scheduler, tests); a process
    given a secrets folder (any function) gets only the secrets it lists, as on OpenFaaS."""
    _LOCAL_SECRET_DEFAULTS[env_name] = default  # what check_production() recognises as a local default
    functions_dir = os.environ.get("CS_SECRETS_DIR")
    value = _read_secret(_secrets_folder(), name)
    if value is not None:
        return value
    if env_name in os.environ:
        return os.environ[env_name]
    if not functions_dir:
        value = _read_secret((state_dir or _state_dir()) / STACK_SECRETS_DIR, name)
        if value is not None:
            return value
    return default


def _read_secret(folder: Path, name: str) -> str | None:
    try:
        return (folder / name).read_text().strip()
    except OSError:
        return None


# --------------------------------------------------------------------------- production


class ProductionSettingsError(RuntimeError):
    """A production process would run with a local-stack secret or password."""


# Every setting that holds a secret or a password: its secret file (/var/openfaas/secrets/<file>: what
# OpenFaaS and the Kubernetes manifests mount) and its environment variable. None may keep its local default in
# production; deploy/k8s/secrets/secrets.env.example documents each one.
SECRET_SETTINGS: dict[str, tuple[str, str]] = {
    "jwt_secret": ("jwt-secret", "CS_JWT_SECRET"),
    "invocation_secret": ("invocation-secret", "CS_INVOCATION_SECRET"),
    "execution_token_secret": ("execution-token-secret", "CS_EXECUTION_TOKEN_SECRET"),
    "openfaas_password": ("basic-auth-password", "CS_OPENFAAS_PASSWORD"),
    "pg_password": ("pg-password", "CS_PG_PASSWORD"),
    "pg_reader_password": ("pg-reader-password", "CS_PG_READER_PASSWORD"),
    "s3_access_key": ("s3-access-key", "CS_S3_ACCESS_KEY"),
    "s3_secret_key": ("s3-secret-key", "CS_S3_SECRET_KEY"),
}
_LOCAL_SECRET_DEFAULTS: dict[str, str] = {}  # env var -> the local stack's default, recorded by secret()


def production() -> bool:
    """Whether this process runs in production: `CS_ENV=production` or `CS_ENV=local` decides; unset,
    a process inside a Kubernetes pod is production (the kubelet sets KUBERNETES_SERVICE_HOST in every
    container, OpenFaaS functions included, so no manifest or function spec has to remember a flag)."""
    mode = os.environ.get("CS_ENV", "").strip().lower()
    if mode not in ("", "production", "local"):
        raise ProductionSettingsError(f"CS_ENV must be 'production' or 'local', not {mode!r}")
    return mode == "production" or (not mode and bool(os.environ.get("KUBERNETES_SERVICE_HOST")))


def _secret_source(name: str, env_name: str, state_dir: Path) -> str | None:
    """Where secret() found a setting (in its order), or None when it fell back to its default."""
    if (_secrets_folder() / name).is_file():
        return str(_secrets_folder() / name)
    if env_name in os.environ:
        return env_name
    stack_file = state_dir / STACK_SECRETS_DIR / name
    if not os.environ.get("CS_SECRETS_DIR") and stack_file.is_file():
        return str(stack_file)
    return None


def check_production(cfg: Settings) -> Settings:
    """Production refuses the local stack's secrets instead of falling back to them silently.

    A secret or password given to this process (secret file or environment) that is empty or still the
    local default stops it here, naming the setting. One not given at all is removed from `cfg`, so its
    first use raises ProductionSettingsError naming it: each process gets only the secrets it needs (a
    script function holds the invocation secret alone), and a service checks its own at start with
    `cfg.require(...)`.
    """
    refused: list[str] = []
    unset: dict[str, str] = {}
    for field_name, (file_name, env_name) in SECRET_SETTINGS.items():
        source = _secret_source(file_name, env_name, cfg.state_dir)
        value = getattr(cfg, field_name)
        if source is None:
            unset[field_name] = (f"{field_name} is not configured (secret file {_secrets_folder() / file_name} or "
                                 f"{env_name}); production never uses the local stack's default")
        elif not value:
            refused.append(f"{field_name} is empty (from {source})")
        elif value == _LOCAL_SECRET_DEFAULTS.get(env_name):
            refused.append(f"{field_name} is the local stack's default (from {source})")
    if refused:
        raise ProductionSettingsError("refusing to run in production with local secrets: " + "; ".join(refused))
    for field_name in unset:
        if not isinstance(getattr(Settings, field_name, None), property):  # a property reads when asked
            object.__delattr__(cfg, field_name)
    object.__setattr__(cfg, "_unset_secrets", unset)
    return cfg


@functools.cache
def settings() -> Settings:
    cfg = Settings()
    return check_production(cfg) if production() else cfg


if production():  # every service imports this module first: a wrong secret stops it before it serves anything
    settings()
