"""scheduler: the realtime scheduler service (long-running, not a function).

All logic lives in customscripts.realtime.scheduler; this only wires it up. Run replicas with
`python -m scheduler.main` (or `customscripts scheduler`); they share the JetStream durable consumer.
"""

import sys

from customscripts.realtime.scheduler import run_scheduler

if __name__ == "__main__":
    sys.exit(run_scheduler(sys.argv[1:]))
