"""scheduler: the realtime scheduler service (long-running, not a function).

All logic lives in customscripts.realtime.scheduler; this only wires it up. Run replicas with
`python -m scheduler.main` (the scheduler image's command, scheduler/Dockerfile) or `customscripts scheduler`;
they share the JetStream durable consumer.
"""

from __future__ import annotations

import sys

from customscripts.config import settings
from customscripts.realtime.scheduler import run_scheduler

# The secrets a replica uses: invocation tokens and prefetch MACs, execution tokens for realtime reads,
# PostgreSQL (writer and the gateway's read-only role for prefetched windows), and, to redeploy a version
# whose function is gone, the gateway's /system API and the script in the bucket. In production each must be
# configured (customscripts.config.check_production): checked here, before the first event, not at it.
SCHEDULER_SECRETS = ("invocation_secret", "execution_token_secret", "pg_password", "pg_reader_password",
                     "openfaas_password", "s3_access_key", "s3_secret_key")


def main(argv: list[str]) -> int:
    cfg = settings()
    cfg.require(*SCHEDULER_SECRETS)
    if cfg.scheduler_metrics_port and not any(arg.startswith("--metrics-port") for arg in argv):
        from customscripts.realtime import metrics

        # /metrics, /healthz, /readyz on CS_SCHEDULER_METRICS_ADDR (0.0.0.0 in a pod, so Prometheus and the
        # kubelet's probes reach it)
        metrics.serve(cfg.scheduler_metrics_port, cfg.scheduler_metrics_addr)
    return run_scheduler(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
