"""Functions run from exactly the file tree their image gets: a build context (faas/build.py) run by
`python index.py` in a venv of only its own requirements, with only its deployment's environment.

So what would break an image breaks here: every requirement each function lists is needed (removing
any one of them stops the function from starting, with a line naming the module), the platform package
is imported from the context's own copy, and a context without that copy does not start. The copy
leaves out `customscripts/local/` (faas/build.py LOCAL_ONLY): every function serves without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from customscripts.config import REPO_ROOT, settings
from customscripts.faas import build
from customscripts.faas.runner import HANDLER_IMPORT_FAILED
from customscripts.http import KeepAlivePool
from customscripts.local.venvs import Environments

SCRIPT = "def run(ctx):\n    return 1.0\n"


def _context(kind: str, functions: Path) -> Path:
    if kind == "script":
        meta = {"script_id": "ctx", "version": 1, "tier": "pro", "output_schema": {"type": "number"}}
        return build.render_context("ctx", 1, SCRIPT, meta, functions_dir=functions).path
    return build.render_stack_function(kind, functions_dir=functions).path


def _handler_folder(kind: str) -> Path:
    """A folder shaped like a context root whose requirements are the function's (for listing them)."""
    return REPO_ROOT / "templates" / "script" if kind == "script" else REPO_ROOT / kind


def _cases() -> list[tuple[str, str]]:
    cases = []
    for kind in ("script", "registry-fn", "gateway-fn"):
        folder = _handler_folder(kind)
        lines = [ln.split("#", 1)[0].strip() for ln in (folder / "requirements.txt").read_text().splitlines()]
        cases += [(kind, line) for line in lines if line]
    return cases


# the modules each requirement provides (what the function would fail to import without it)
MODULES = {"psycopg": ("psycopg", "psycopg_pool"), "pyjwt": ("jwt",), "pyyaml": ("yaml",),
           "prometheus-client": ("prometheus_client",)}


def _modules_of(requirement: str) -> tuple[str, ...]:
    name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower()
    return MODULES.get(name, (name.replace("-", "_"),))


def _start(context: Path, socket_path: Path, environments: Environments) -> subprocess.Popen:
    """`python index.py` in the context, as the provider and the image start it: a clean environment."""
    python = environments.python_for(context)
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "LANG": "C.UTF-8", "CS_FN_LISTEN": f"unix:{socket_path}",
           "CS_FUNCTION_SAMPLE_DATA": "1", "CS_ISOLATION": settings().isolation_mode,
           "CS_PG_PORT": str(settings().pg_port), "CS_REDIS_PORT": str(settings().redis_port)}
    return subprocess.Popen([str(python), "index.py"], cwd=context, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _serving(proc: subprocess.Popen, socket_path: Path, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if socket_path.exists():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def environments() -> Environments:
    return Environments(settings().state_dir / "venvs")


@pytest.fixture
def stop() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind", ["script", "registry-fn", "gateway-fn"])
def test_function_serves_from_its_context_with_its_own_package_copy(kind: str, tmp_path: Path,
                                                                    environments: Environments,
                                                                    stop: list[subprocess.Popen]) -> None:
    context = _context(kind, tmp_path)
    package = context / "function" / "customscripts"
    # the local-only subpackage (local provider, local stack, demo) is not in any image, so not here
    assert (package / "faas" / "runner.py").is_file() and not (package / "local").exists()
    assert not [p for p in context.rglob("*") if "local" in p.relative_to(context).parts]
    sock = tmp_path / "fn.sock"
    proc = _start(context, sock, environments)
    stop.append(proc)
    assert _serving(proc, sock), proc.communicate(timeout=10)[0][-2000:]
    pool, _ = KeepAlivePool.for_url("http+unix://" + str(sock).replace("/", "%2F"))
    reply = pool.request("GET", "/_/health" if kind == "script" else "/healthz", timeout=30)
    assert reply.status < 500, reply.body[:500]
    # the environment holds no customscripts: what the function runs is the copy inside its context
    python = environments.python_for(context)
    found = subprocess.run([str(python), "-c", "import customscripts"], cwd=tmp_path, capture_output=True,
                           text=True, env={"PATH": "/usr/bin:/bin"})
    assert found.returncode != 0 and "No module named 'customscripts'" in found.stderr


@pytest.mark.parametrize(("kind", "requirement"), _cases())
def test_a_missing_requirement_stops_the_function_from_starting(kind: str, requirement: str, tmp_path: Path,
                                                               environments: Environments,
                                                               stop: list[subprocess.Popen]) -> None:
    context = _context(kind, tmp_path)
    reqs = context / "function" / "requirements.txt"
    kept = [line for line in reqs.read_text().splitlines() if line.split("#", 1)[0].strip() != requirement]
    assert len(kept) < len(reqs.read_text().splitlines())
    reqs.write_text("\n".join(kept) + "\n")
    python = environments.python_for(context)
    module = _modules_of(requirement)[0]
    probe = f"import importlib.util as u; print(u.find_spec({module!r}) is not None)"
    still = subprocess.run([str(python), "-c", probe],
                           capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    if still.stdout.strip() == "True":
        pytest.skip(f"{module} still comes with another requirement of {kind}")
    proc = _start(context, tmp_path / "fn.sock", environments)
    stop.append(proc)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == HANDLER_IMPORT_FAILED, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert "cannot start" in last and "is not installed" in last and "requirements.txt" in last, last
    assert any(repr(name) in last for name in _modules_of(requirement)), last


def test_a_context_without_the_package_copy_does_not_start(tmp_path: Path, environments: Environments,
                                                          stop: list[subprocess.Popen]) -> None:
    """The class of gateway-fn's old handler, which found `customscripts` only through the checkout."""
    context = _context("gateway-fn", tmp_path)
    shutil.rmtree(context / "function" / "customscripts")
    proc = _start(context, tmp_path / "fn.sock", environments)
    stop.append(proc)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "No module named 'customscripts'" in output, output[-2000:]
