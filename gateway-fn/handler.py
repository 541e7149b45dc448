"""gateway-fn: the Data Access Gateway as a python3-http function; the logic is customscripts.gateway."""

from customscripts.gateway.api import handle as _handle


def handle(event, context):
    return _handle(event, context)
