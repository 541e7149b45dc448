"""python3-http entrypoint: serve function/handler.py's `handle(event, context)` with the platform's
HTTP server (customscripts.http.HandlerServer), the same server every test and benchmark runs.

In an image of-watchdog (http mode) runs `python index.py` and proxies to 127.0.0.1:5000; without the
watchdog (local images, the local provider) the address comes from CS_FN_LISTEN (`host:port` or
`unix:/path`). The platform package travels in the build context at function/customscripts
(stack.yml `configuration.copy`), so function/ goes first on sys.path.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "function"))

if __name__ == "__main__":
    from customscripts.faas.runner import main

    sys.exit(main([HERE]))
