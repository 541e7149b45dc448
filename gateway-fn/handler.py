"""gateway-fn: the Data Access Gateway (python3-http). All logic lives in customscripts.gateway.api; the
package reaches the build context at function/customscripts (stack.yml configuration.copy) and
index.py puts function/ first on sys.path."""

from customscripts.gateway.api import handle as _handle
from customscripts.metrics import dependency_checks

# its ops listener (/metrics, /healthz, /readyz: faas/runner.py, customscripts/metrics.py) and what readiness checks
COMPONENT, READINESS = "gateway-fn", dependency_checks("postgres-reader", "redis")


def handle(event, context):
    return _handle(event, context)
