"""How every function process serves: the body of the python3-http template's index.py
(templates/python3-http/index.py calls `main([<context root>])`), in an image and under the local provider.

It imports `handle` from `<dir>/function/handler.py` (a build context as `faas-cli build --shrinkwrap`
lays it out) as the package `function.handler`, and serves it with `customscripts.http.HandlerServer`:
the python3-http contract and the responses the upstream template's Flask + waitress give, at a
fraction of their per-request cost (every one-time execute crosses three function processes).

Where it listens: CS_FN_LISTEN (`host:port` or `unix:/path`), else 127.0.0.1:5000, of-watchdog's
upstream. Under the local provider (CS_FN_READY_FD set) it listens on CS_FN_PORT and writes the port to
that file descriptor once the server listens, so the provider needs no readiness polling; calls that
reach the function directly mark CS_FN_ACTIVITY_FILE for the provider's idle reaper, and the process
exits when the provider goes away. Every function also serves its ops routes (/metrics, /healthz,
/readyz) on a listener of its own (`_serve_ops`), whose port follows the served one on that descriptor.
A script function first joins its tenant's CPU group (CS_CPU_GROUP,
faas/cpugroups.py). A handler that cannot be imported (a missing requirement or file) ends the process
with one line naming what is missing and exit status 3.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

HANDLER_IMPORT_FAILED = 3  # exit status: the handler could not be imported (see HandlerImportError)
DEFAULT_LISTEN = "127.0.0.1:5000"  # of-watchdog's upstream_url in the template's Dockerfile


class HandlerImportError(RuntimeError):
    """The function's handler could not be imported: a requirement or a file is missing from its build
    context. The message names what is missing and where it should have been."""


def load_handler(folder: Path):
    """Import the handler module as `function.handler`, the package name the template gives it."""
    folder = folder.resolve()
    package_dir = folder / "function" if (folder / "function" / "handler.py").is_file() else folder
    if not (package_dir / "handler.py").is_file():
        raise HandlerImportError(f"no handler.py in {folder} or {folder}/function")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    package = types.ModuleType("function")
    package.__path__ = [str(package_dir)]  # type: ignore[attr-defined]
    package.__file__ = str(package_dir / "__init__.py")
    sys.modules["function"] = package
    try:
        return importlib.import_module("function.handler")
    except ModuleNotFoundError as exc:
        sys.modules.pop("function", None)
        missing = (exc.name or "?").split(".")[0]
        raise HandlerImportError(
            f"module {missing!r} is not installed in the function's environment, which holds only its build "
            f"context's requirements: list the package that provides it in {package_dir / 'requirements.txt'}"
        ) from exc


def _watch_parent(parent: int) -> None:
    """The provider is gone: stop as it would stop us (SIGTERM, so a handler can exit cleanly)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            os._exit(0)


def _recording_activity(handle: Callable[[Any, Any], Any], path: str) -> Callable[[Any, Any], Any]:
    """The handler, marking the function's activity file (its mtime) at most once a second: the
    provider's idle reaper also sees the calls that reached this function without going through it."""
    last = [0.0]

    def recorded(event: Any, context: Any) -> Any:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            with contextlib.suppress(OSError):
                os.utime(path)
        return handle(event, context)

    return recorded


def _serve_ops(handler: Any) -> int:
    """Start the function's ops listener (/metrics, /healthz, /readyz: customscripts/metrics.py) on
    CS_FN_METRICS_ADDR:CS_FN_METRICS_PORT, as the component and with the readiness checks its handler module
    names (COMPONENT, READINESS); its port, 0 when switched off (a port below 0). Every platform handler
    names its COMPONENT and must have prometheus-client; any other python3-http handler gets the listener
    only where its environment has it."""
    import importlib.util

    from customscripts.config import settings

    cfg = settings()
    if cfg.fn_metrics_port < 0:
        return 0
    if not hasattr(handler, "COMPONENT") and importlib.util.find_spec("prometheus_client") is None:
        return 0
    from customscripts import metrics

    server = metrics.serve(getattr(handler, "COMPONENT", "script-function"), cfg.fn_metrics_port,
                           cfg.fn_metrics_addr, getattr(handler, "READINESS", None))
    return server.port


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m customscripts.faas.runner <function-folder>", file=sys.stderr)
        return 2
    from customscripts.http import HandlerServer

    group = os.environ.get("CS_CPU_GROUP")
    if group:  # before the handler starts its sandbox: the whole process tree shares the tenant's CPU
        from customscripts.faas.cpugroups import join

        join(group)
    try:
        handler = load_handler(Path(args[0]))
    except HandlerImportError as exc:
        print(f"function {os.environ.get('CS_FUNCTION_NAME') or args[0]} cannot start: {exc}", file=sys.stderr)
        return HANDLER_IMPORT_FAILED
    try:
        ops_port = _serve_ops(handler)
    except ModuleNotFoundError as exc:
        print(f"function {os.environ.get('CS_FUNCTION_NAME') or args[0]} cannot start: module {exc.name!r} is not "
              "installed in the function's environment: list it in its requirements.txt", file=sys.stderr)
        return HANDLER_IMPORT_FAILED
    handle = handler.handle
    activity = os.environ.get("CS_FN_ACTIVITY_FILE")
    if activity:
        handle = _recording_activity(handle, activity)
    threads = int(os.environ.get("CS_FN_THREADS", "8"))
    ready_fd = os.environ.get("CS_FN_READY_FD")
    listen = os.environ.get("CS_FN_LISTEN") or DEFAULT_LISTEN
    if ready_fd is not None and not os.environ.get("CS_FN_LISTEN"):
        listen = f"127.0.0.1:{int(os.environ.get('CS_FN_PORT') or 0)}"
    server = HandlerServer.for_handler(handle, listen=listen, threads=threads, idle_timeout=120, name="fn")
    if ready_fd is not None:
        fd = int(ready_fd)
        os.write(fd, f"{server.port} {ops_port}\n".encode())
        os.close(fd)
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
