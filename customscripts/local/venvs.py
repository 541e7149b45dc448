"""Virtual environments for local function processes, one per distinct set of requirements.

An image holds exactly its build context's requirements (the template's `requirements.txt` and the
function's `function/requirements.txt`); so does the environment the local provider runs a function
in: a venv made from the base interpreter (no site-packages of the host's, none of the checkout's
venv), keyed by the interpreter's version and the requirement lines, made once and shared by every
function with the same lines (all script versions share one). The platform package is not installed
in it: the function imports its own copy from function/customscripts, as in the image. So a
requirement or a file missing from a build context fails locally as it would in the image.

A wheelhouse at `<state>/wheelhouse` (the image builder's) is used when present, else the package
index pip is configured with.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from customscripts import logs
from customscripts.faas.build import file_lock

log = logs.get("customscripts.local.venvs")

REQUIREMENT_FILES = ("requirements.txt", "function/requirements.txt")
READY = ".ready"


class EnvironmentBuildFailed(RuntimeError):
    """pip could not install a build context's requirements (the message ends with pip's own)."""


def requirements(context: Path) -> list[str]:
    """The context's requirement lines (both files), comments and blanks dropped, sorted, deduplicated."""
    lines: set[str] = set()
    for rel in REQUIREMENT_FILES:
        path = context / rel
        if path.is_file():
            for raw in path.read_text().splitlines():
                line = raw.split("#", 1)[0].strip()
                if line:
                    lines.add(line)
    return sorted(lines)


def environment_key(lines: list[str]) -> str:
    digest = hashlib.sha256(f"{platform.python_version()}\n{sys.platform}\n".encode())
    digest.update("\n".join(lines).encode())
    return digest.hexdigest()[:16]


class Environments:
    """The folder of per-requirements venvs (`<state>/venvs`)."""

    def __init__(self, root: Path, *, wheelhouse: Path | None = None, python: str | None = None) -> None:
        self.root = root
        self.wheelhouse = wheelhouse
        # venvs are made from the interpreter this one was made from: nothing of this venv leaks in
        self.base_python = python or getattr(sys, "_base_executable", sys.executable)

    def python_for(self, context: Path) -> Path:
        """The interpreter of the venv for this build context's requirements, made on first use."""
        lines = requirements(context)
        env = self.root / environment_key(lines)
        python = env / "bin" / "python"
        if (env / READY).is_file():
            return python
        with file_lock(self.root / f".{env.name}.lock"):
            if (env / READY).is_file():
                return python
            shutil.rmtree(env, ignore_errors=True)  # a half-made one from an interrupted run
            started = time.monotonic()
            logs.event(log, "preparing a function environment", env=env.name, requirements=len(lines))
            self._run([self.base_python, "-m", "venv", "--without-pip", str(env)], "create the venv")
            if lines:
                reqs = env / "requirements.txt"
                reqs.write_text("\n".join(lines) + "\n")
                cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                       "--disable-pip-version-check", "--no-input", "-r", str(reqs)]
                if self.wheelhouse is not None and self.wheelhouse.is_dir():
                    cmd += ["--find-links", str(self.wheelhouse)]
                self._run(cmd, f"install {', '.join(lines)}")
            (env / READY).write_text("\n".join(lines) + "\n")
            logs.event(log, "function environment ready", env=env.name,
                       seconds=round(time.monotonic() - started, 1))
        return python

    @staticmethod
    def _run(cmd: list[str], what: str) -> None:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            logs.event(log, "function environment failed", logging.ERROR, step=what, error=" | ".join(tail))
            raise EnvironmentBuildFailed(f"could not {what}: {' | '.join(tail)}")
