"""registry-fn: the public API (python3-http). All logic lives in customscripts.registry.api; the
package reaches the build context at function/customscripts (stack.yml configuration.copy) and
index.py puts function/ first on sys.path."""

import importlib

from customscripts.metrics import dependency_checks
from customscripts.registry.api import handle as _handle
from customscripts.registry.audit import exit_cleanly_on_sigterm

# The routes' own modules, imported now: a requirement missing from function/requirements.txt stops the
# function at its start, not at its first request.
for _module in ("customscripts.execution", "customscripts.realtime.service", "customscripts.series"):
    importlib.import_module(_module)

exit_cleanly_on_sigterm()  # index.py imports this module in its main thread: queued audit rows get written

# its ops listener (/metrics, /healthz, /readyz: faas/runner.py, customscripts/metrics.py) and what readiness checks
COMPONENT, READINESS = "registry-fn", dependency_checks("postgres", "redis")


def handle(event, context):
    return _handle(event, context)
