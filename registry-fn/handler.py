"""registry-fn: the public API (python3-http). All logic lives in customscripts.registry.api.

stack.yml copies the `customscripts` package next to this file (configuration.copy); putting this
folder first on sys.path makes `import customscripts` resolve to that copy in the image.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from customscripts.registry.api import handle as _handle  # noqa: E402
from customscripts.registry.audit import exit_cleanly_on_sigterm  # noqa: E402

exit_cleanly_on_sigterm()  # index.py imports this module in its main thread: queued audit rows get written


def handle(event, context):
    return _handle(event, context)
