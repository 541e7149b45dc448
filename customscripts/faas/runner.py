"""Entry point of one local function process: the python3-http index.py, run by the local provider.

`python -m customscripts.faas.runner <dir>` imports `handle` from `<dir>/function/handler.py` (a
shrinkwrapped build context, as faas-cli lays it out) or `<dir>/handler.py` (a bare handler
folder such as `registry-fn/`), exactly as index.py does (`from function import handler`), and
serves it on its loopback port (CS_FN_PORT, chosen by the provider) with
`customscripts.http.HandlerServer`: the python3-http contract and the responses index.py's Flask +
waitress give, at a fraction of their per-request cost (every one-time execute crosses three
function processes). The port is written to the file descriptor named by CS_FN_READY_FD once the
server listens, so the provider needs no readiness polling; calls that reach the function directly
mark CS_FN_ACTIVITY_FILE for the provider's idle reaper. A script function first joins its tenant's
CPU group (CS_CPU_GROUP, faas/cpugroups.py). The process exits when its parent (the provider) goes away.
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


def load_handler(folder: Path):
    """Import the handler module as `function.handler`, the package name the template gives it."""
    folder = folder.resolve()
    package_dir = folder / "function" if (folder / "function" / "handler.py").is_file() else folder
    if not (package_dir / "handler.py").is_file():
        raise SystemExit(f"no handler.py in {folder} or {folder}/function")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    package = types.ModuleType("function")
    package.__path__ = [str(package_dir)]  # type: ignore[attr-defined]
    package.__file__ = str(package_dir / "__init__.py")
    sys.modules["function"] = package
    return importlib.import_module("function.handler")


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
    handler = load_handler(Path(args[0]))
    handle = handler.handle
    activity = os.environ.get("CS_FN_ACTIVITY_FILE")
    if activity:
        handle = _recording_activity(handle, activity)
    threads = int(os.environ.get("CS_FN_THREADS", "8"))
    # Standalone (no provider) it listens where index.py would: $port, else 5000.
    if os.environ.get("CS_FN_READY_FD"):
        port = int(os.environ.get("CS_FN_PORT") or 0)
    else:
        port = int(os.environ.get("port") or 5000)  # noqa: SIM112 - of-watchdog name
    server = HandlerServer.for_handler(handle, "127.0.0.1", port, threads=threads, idle_timeout=120,
                                       name="fn")
    ready_fd = os.environ.get("CS_FN_READY_FD")
    if ready_fd is not None:
        fd = int(ready_fd)
        os.write(fd, f"{server.port}\n".encode())
        os.close(fd)
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
