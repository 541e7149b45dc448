"""Build contexts for image tests, laid out as `faas-cli build --shrinkwrap` does (docs/openfaas.md §3.2).

The platform functions' contexts come from `build.render_stack_function` and script versions' from
`build.render_context` when this checkout's renderer makes python3-http contexts (a Dockerfile at the
root); otherwise `shrinkwrap()` lays one out here: templates/python3-http/ at the root, the handler
folder overlaid into function/, the package copied to function/customscripts (stack.yml's copy).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from customscripts.config import REPO_ROOT
from customscripts.faas import build, images

TEMPLATE = REPO_ROOT / "templates" / "python3-http"
# Serves function/handler.py on CS_FN_LISTEN with HandlerServer, for a checkout whose template has no
# index.py yet (the template's own is used whenever it exists).
FALLBACK_INDEX = '''import importlib, os, sys, types
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "function"))
package = types.ModuleType("function")
package.__path__ = [os.path.join(HERE, "function")]
sys.modules["function"] = package
from customscripts.http import HandlerServer
handler = importlib.import_module("function.handler")
host, port = os.environ.get("CS_FN_LISTEN", "127.0.0.1:5000").rsplit(":", 1)
HandlerServer.for_handler(handler.handle, host, int(port)).serve_forever()
'''
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")


def shrinkwrap(dest: Path, handler: Path, *, requirements: Path | None = None) -> Path:
    """dest/ = the python3-http template + `handler`'s files in function/ + function/customscripts."""
    shutil.copytree(TEMPLATE, dest, ignore=_SKIP)
    if not (dest / "index.py").exists():
        (dest / "index.py").write_text(FALLBACK_INDEX)
    if not (dest / "requirements.txt").exists():
        (dest / "requirements.txt").write_text("")
    shutil.copytree(handler, dest / "function", dirs_exist_ok=True, ignore=_SKIP)
    if requirements is not None:
        shutil.copy(requirements, dest / "function" / "requirements.txt")
    (dest / "function" / "requirements.txt").touch()
    shutil.copytree(REPO_ROOT / "customscripts", dest / "function" / "customscripts", ignore=_SKIP)
    return dest


def platform_context(name: str, tmp: Path) -> Path:
    render = getattr(build, "render_stack_function", None)
    if render is not None:
        rendered = render(name, functions_dir=tmp / "functions")
        return Path(getattr(rendered, "path", rendered))
    return shrinkwrap(tmp / name, REPO_ROOT / name)


def script_context(script_id: str, version: int, source: str, meta: dict, tmp: Path) -> Path:
    rendered = build.render_context(script_id, version, source, meta, functions_dir=tmp / "functions")
    if (rendered.path / "Dockerfile").is_file() and (rendered.path / "index.py").is_file():
        return rendered.path
    # the renderer still lays out the old script template: its handler folder over python3-http
    old = REPO_ROOT / "templates" / "script"
    context = shrinkwrap(tmp / rendered.name, old / "function", requirements=old / "requirements.txt")
    shutil.copy(rendered.path / build.BUILD_STAMP, context / build.BUILD_STAMP)
    (context / "function" / "script.py").write_text(source)
    (context / "function" / "meta.json").write_text((rendered.path / "function" / "meta.json").read_text())
    return context


@contextlib.contextmanager
def running(engine: images.Engine, image: str, *, env: dict[str, str] | None = None) -> Iterator[str]:
    """The image as a container the way functions run: read-only root, tmpfs /tmp, uid from the image
    (non-root), no capabilities, no new privileges, no network at all. Yields its name."""
    name = f"cs-test-{uuid.uuid4().hex[:10]}"
    args = ["--detach", "--name", name, "--read-only", "--tmpfs", "/tmp:rw,size=64m,mode=1777",
            "--network", "none", "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--memory", "512m"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    started = subprocess.run(engine.run_command(*args, image), capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield name
    finally:
        subprocess.run(engine.command("rm", "--force", "--time", "0", name), capture_output=True, timeout=60)


# Asks the container's own server over its loopback (the container has no other network), from inside.
_ASK = '''import sys, time, urllib.request, urllib.error
method, path = sys.argv[1], sys.argv[2]
for _ in range(300):
    try:
        body = b"{}" if method == "POST" else None
        req = urllib.request.Request("http://127.0.0.1:8080" + path, method=method, data=body)
        with urllib.request.urlopen(req, timeout=5) as r:
            print(r.status); print(r.read()[:300].decode(errors="replace")); break
    except urllib.error.HTTPError as e:
        print(e.code); print(e.read()[:300].decode(errors="replace")); break
    except OSError:
        time.sleep(0.1)
else:
    print(0); print("never listened")
'''


def ask(engine: images.Engine, container: str, method: str, path: str) -> tuple[int, str]:
    """An HTTP request to the container's server on 127.0.0.1:8080, inside the container; (status, body)."""
    done = subprocess.run(engine.command("exec", container, "python", "-c", _ASK, method, path),
                          capture_output=True, text=True, timeout=90)
    lines = (done.stdout or "0\n").split("\n", 1)
    status = int(lines[0]) if lines[0].strip().isdigit() else 0
    return status, (lines[1] if len(lines) > 1 else "") + done.stderr


def whoami(engine: images.Engine, container: str) -> str:
    done = subprocess.run(engine.command("exec", container, "id", "-u"), capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def logs_of(engine: images.Engine, container: str) -> str:
    done = subprocess.run(engine.command("logs", container), capture_output=True, text=True, timeout=30)
    return (done.stdout + done.stderr)[-3000:]


