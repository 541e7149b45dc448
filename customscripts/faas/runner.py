"""Entry point of one local function process: the python3-http index.py, run by the local provider.

`python -m customscripts.faas.runner <dir>` imports `handle` from `<dir>/function/handler.py` (a
shrinkwrapped build context, as faas-cli lays it out) or `<dir>/handler.py` (a bare handler
folder such as `registry-fn/`), exactly as index.py does (`from function import handler`), and
serves it on a loopback port (CS_FN_PORT, its local Service port, else an ephemeral one) with
`customscripts.http.HandlerServer`: the python3-http
contract and the responses index.py's Flask + waitress give, at a fraction of their per-request
cost (every one-time execute crosses three function processes). The port is written to the file
descriptor named by CS_FN_READY_FD once the server listens, so the provider needs no port guessing
and no readiness polling. The process exits when its parent (the provider) goes away.
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
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m customscripts.faas.runner <function-folder>", file=sys.stderr)
        return 2
    from customscripts.http import HandlerServer

    handler = load_handler(Path(args[0]))
    threads = int(os.environ.get("CS_FN_THREADS", "8"))
    # Standalone (no provider) it listens where index.py would: $port, else 5000.
    if os.environ.get("CS_FN_READY_FD"):
        port = int(os.environ.get("CS_FN_PORT") or 0)
    else:
        port = int(os.environ.get("port") or 5000)  # noqa: SIM112 - of-watchdog name
    server = HandlerServer.for_handler(handler.handle, "127.0.0.1", port, threads=threads, idle_timeout=120,
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
