"""Prometheus metrics of the realtime scheduler: defined in customscripts/metrics.py (one place for every
component's metrics) and re-exported here under the names the scheduler uses."""

from __future__ import annotations

from customscripts import metrics as _metrics
from customscripts.metrics import (  # noqa: F401 - the scheduler's names
    BATCH_ITEMS,
    BREAKER_OPENED,
    DEAD_LETTERS,
    EVALUATIONS,
    INVOKE_SECONDS,
    ITEM_RETRIES,
    PREFETCHED_READS,
    QUEUED,
    RETRIES,
)
from customscripts.metrics import REALTIME_LATENCY as LATENCY  # noqa: F401

SCHEDULER_CHECKS = ("postgres", "redis", "nats")


def serve(port: int, addr: str | None = None) -> _metrics.OpsServer:
    """The scheduler's /metrics, /healthz and /readyz (PostgreSQL, Redis, NATS) on addr:port (default:
    CS_SCHEDULER_METRICS_ADDR, loopback locally), with the consumer's backlog sampled at each scrape."""
    from customscripts.config import settings

    cfg = settings()
    _metrics.watch_consumer(f"http://{cfg.nats_host}:{cfg.nats_monitor_port}", cfg.nats_stream, cfg.scheduler_durable)
    return _metrics.serve("scheduler", port, addr or cfg.scheduler_metrics_addr,
                          _metrics.dependency_checks(*SCHEDULER_CHECKS))
