"""Prometheus metrics of the realtime scheduler (scraped from CS_SCHEDULER_METRICS_PORT when set)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

EVALUATIONS = Counter("cs_realtime_evaluations_total", "Realtime evaluations by status", ["status"])
RETRIES = Counter("cs_realtime_batch_retries_total", "Event batches left unacknowledged for redelivery because "
                  "publishing (PostgreSQL, Redis) failed")
ITEM_RETRIES = Counter("cs_realtime_item_retries_total", "Evaluations tried again in their batch, by why the last "
                       "attempt failed", ["reason"])
DEAD_LETTERS = Counter("cs_realtime_dead_letters_total", "Evaluations dead-lettered (recorded, not published; their "
                       "events acknowledged), by reason", ["reason"])
BREAKER_OPENED = Counter("cs_realtime_breaker_opened_total", "Circuit breakers of a function and tenant opened")
LATENCY = Histogram("cs_realtime_event_to_published_seconds", "Event entering JetStream to output published",
                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
INVOKE_SECONDS = Histogram("cs_realtime_invoke_seconds", "One batched function invocation",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
QUEUED = Histogram("cs_realtime_event_queued_seconds", "Event entering JetStream to its batch starting "
                   "(the queueing part of event-to-published)",
                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PREFETCHED_READS = Counter("cs_realtime_prefetched_reads_total", "Script reads answered from data sent along with "
                           "the batch instead of gateway-fn")
BATCH_ITEMS = Histogram("cs_realtime_batch_items", "Items per batched invocation",
                        buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000))


def serve(port: int) -> None:
    start_http_server(port, addr="127.0.0.1")
