"""Container images on a machine with no registry: the engine, the offline base image, the wheelhouse.

Facts of the machines this runs on (docs/openfaas.md §13): podman's default OCI runtime (crun) fails
("cgroups in hybrid mode not supported"), runc works when a container's nofile/nproc rlimits are at
or below the host's hard limits (podman's defaults raise them: "error setting rlimits"); no registry
can be reached, so `python:3.11-slim-bookworm` cannot be pulled. Hence:

- `engine()` finds podman (or docker with a running daemon) and the flags every `run`/`build` needs
  (`--runtime runc`, `--ulimit` at or below the hard limits); `probe()` runs a container once and
  says in one line why none can run, for the provider's fallback to processes and for test skips.
- `ensure_base_image()` makes `localhost/customscripts/base:<hash of its package list>` from Debian
  packages (mmdebstrap of bookworm, then `podman import`), once: Python 3.11 like the production
  base, libseccomp2 for the sandbox's seccomp layer (pyseccomp finds it through ldconfig), nothing
  else. bubblewrap is not in it: inside a container the sandbox runs in `process` mode.
- `ensure_wheelhouse()` downloads or builds, with pip on the host, the wheels of a build context's
  requirements files for the image's Python into `.state/wheelhouse/<content hash>/`; the
  Dockerfile installs from it with `pip install --no-index --find-links`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from customscripts.config import Settings, settings
from customscripts.faas.build import file_lock

Progress = Callable[[str], None]

DEBIAN_SUITE = "bookworm"
IMAGE_PYTHON = "3.11"  # bookworm's python3, and the production Dockerfile's python:3.11-slim-bookworm
# What a function image needs from Debian: Python with venv (pip comes from ensurepip's bundled
# wheel), libseccomp2 (the sandbox's seccomp layer), CA certificates (TLS to MinIO, Redis, the
# registry), passwd (useradd for the non-root user).
BASE_PACKAGES = ("python3", "python3-venv", "libseccomp2", "ca-certificates", "passwd")
BASE_REPOSITORY = "localhost/customscripts/base"
# The host packages that build and run images (deploy/local/bootstrap.sh installs them).
ENGINE_PACKAGES = ("podman", "buildah", "runc", "mmdebstrap", "uidmap")
REQUIREMENTS_FILES = ("requirements.txt", "function/requirements.txt")  # template-level, then the function's


class EngineUnavailable(RuntimeError):
    """No container engine can run a container here; the message is the one-line reason."""


def _noop(_: str) -> None:
    pass


def _run(argv: Sequence[str], *, timeout: float = 120, progress: Progress | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, its output combined; with `progress`, each line is passed on as it comes."""
    if progress is None:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False)
    lines: list[str] = []
    with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        timer = threading.Timer(timeout, proc.kill)  # also when it hangs without printing
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                progress(line.rstrip())
            code = proc.wait()
        finally:
            timer.cancel()
    return subprocess.CompletedProcess(list(argv), code, "".join(lines), "")


def _tail(text: str, lines: int = 1) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(kept[-lines:]) if kept else "(no output)"


@dataclass(frozen=True)
class Engine:
    """A container engine and the flags this host needs for it."""

    name: str  # podman | docker
    path: str
    runtime: str | None  # OCI runtime (podman: runc; docker keeps its daemon's)
    nofile: int
    nproc: int

    def command(self, *args: str) -> list[str]:
        return [self.path, *args]

    def runtime_flags(self) -> list[str]:
        """`--runtime runc` and rlimits at or below the host's hard limits: for `run` and `build`."""
        flags = ["--runtime", self.runtime] if self.runtime else []
        return [*flags, "--ulimit", f"nofile={self.nofile}:{self.nofile}",
                "--ulimit", f"nproc={self.nproc}:{self.nproc}"]

    def run_command(self, *args: str) -> list[str]:
        """`<engine> run <host flags> <args>`: what the provider and the tests start containers with."""
        return [self.path, "run", *self.runtime_flags(), *args]

    def image_exists(self, ref: str) -> bool:
        args = ("image", "exists", ref) if self.name == "podman" else ("image", "inspect", ref)
        return _run(self.command(*args), timeout=60).returncode == 0


def _hard_limit(which: int, wanted: int) -> int:
    hard = resource.getrlimit(which)[1]
    return wanted if hard == resource.RLIM_INFINITY else max(1, min(wanted, hard))


def find_engine(cfg: Settings | None = None) -> Engine:
    """podman, else docker whose daemon answers (CS_CONTAINER_ENGINE chooses); EngineUnavailable says why not."""
    cfg = cfg or settings()
    nofile = _hard_limit(resource.RLIMIT_NOFILE, cfg.container_nofile)
    nproc = _hard_limit(resource.RLIMIT_NPROC, cfg.container_nproc)
    wanted = [cfg.container_engine] if cfg.container_engine else ["podman", "docker"]
    reasons = []
    for name in wanted:
        path = shutil.which(name)
        if path is None:
            reasons.append(f"{name} is not installed")
            continue
        if name == "docker":
            info = _run([path, "info", "--format", "{{.ServerVersion}}"], timeout=20)
            if info.returncode != 0:
                reasons.append(f"docker's daemon does not answer ({_tail(info.stdout + info.stderr)})")
                continue
            return Engine("docker", path, None, nofile, nproc)
        return Engine(name, path, cfg.container_runtime or None, nofile, nproc)
    raise EngineUnavailable("no container engine: " + "; ".join(reasons)
                            + " (deploy/local/bootstrap.sh installs podman, buildah, runc, mmdebstrap)")


@dataclass(frozen=True)
class EngineStatus:
    """The engine and whether it can run a container here; `reason` is one line when it cannot."""

    engine: Engine | None
    reason: str

    @property
    def usable(self) -> bool:
        return self.engine is not None and not self.reason


def _probe(cfg: Settings, image: str | None, build_base: bool, progress: Progress) -> EngineStatus:
    try:
        eng = find_engine(cfg)
    except EngineUnavailable as exc:
        return EngineStatus(None, str(exc))
    if image is None:
        try:
            image = ensure_base_image(eng, cfg, progress=progress) if build_base else base_image_ref()
        except EngineUnavailable as exc:
            return EngineStatus(eng, str(exc))
        if not eng.image_exists(image):
            return EngineStatus(eng, f"{eng.name} has no image to probe with ({image}): run `customscripts build`")
    done = _run(eng.run_command("--rm", "--network", "none", "--read-only", "--user", "65534:65534",
                                image, "python3", "-c", "print('ok')"), timeout=120)
    if done.returncode != 0 or "ok" not in done.stdout:
        return EngineStatus(eng, f"{eng.name} cannot run a container here "
                                 f"({' '.join(eng.runtime_flags())}): {_tail(done.stdout + done.stderr)}")
    return EngineStatus(eng, "")


@functools.cache
def _probe_cached(image: str | None, build_base: bool) -> EngineStatus:
    return _probe(settings(), image, build_base, _noop)


def probe(image: str | None = None, *, build_base: bool = True, fresh: bool = False,
          progress: Progress = _noop) -> EngineStatus:
    """Whether a container can actually run here: starts one (`image`, default the offline base image,
    made first when `build_base`) read-only, without network, as nobody. Cached per process."""
    if fresh:
        return _probe(settings(), image, build_base, progress)
    return _probe_cached(image, build_base)


def require_engine(**kwargs: object) -> Engine:
    """The engine, after a probe; EngineUnavailable with the one-line reason otherwise."""
    status = probe(**kwargs)  # type: ignore[arg-type]
    if not status.usable:
        raise EngineUnavailable(status.reason)
    assert status.engine is not None
    return status.engine


# --------------------------------------------------------------------------- the base image


def base_image_ref(packages: Sequence[str] = BASE_PACKAGES, suite: str = DEBIAN_SUITE) -> str:
    """`localhost/customscripts/base:<hash>`: a new package list is a new image, an old one is reused."""
    digest = hashlib.sha256("\n".join([suite, *sorted(packages)]).encode()).hexdigest()[:12]
    return f"{BASE_REPOSITORY}:{suite}-{digest}"


def ensure_base_image(eng: Engine, cfg: Settings | None = None, *, packages: Sequence[str] = BASE_PACKAGES,
                      progress: Progress = _noop) -> str:
    """The offline base image's ref, made with mmdebstrap + import when absent (~40 s, 220 MB)."""
    cfg = cfg or settings()
    ref = base_image_ref(packages)
    if eng.image_exists(ref):
        return ref
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise EngineUnavailable(f"base image {ref} is missing and mmdebstrap is not installed "
                                "(deploy/local/bootstrap.sh installs it)")
    with file_lock(cfg.state_dir / "images" / ".base.lock"):
        if eng.image_exists(ref):  # made by another process meanwhile
            return ref
        progress(f"base image {ref}: mmdebstrap {DEBIAN_SUITE} with {', '.join(packages)}")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="cs-base-", dir=cfg.state_dir / "images") as tmp:
            tar = Path(tmp) / "base.tar"
            argv = [mmdebstrap, "--variant=minbase", "--mode=auto", f"--include={','.join(packages)}",
                    "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*", "--aptopt=APT::Install-Recommends \"false\"",
                    DEBIAN_SUITE, str(tar)]
            if cfg.debian_mirror:
                argv.append(cfg.debian_mirror)
            done = _run(argv, timeout=1800, progress=lambda line: progress(f"  {line}"))
            if done.returncode != 0:
                raise EngineUnavailable(f"mmdebstrap failed: {_tail(done.stdout, 3)}")
            done = _run(eng.command("import", "--change", "CMD [\"python3\"]", str(tar), ref), timeout=600)
            if done.returncode != 0:
                raise EngineUnavailable(f"{eng.name} import failed: {_tail(done.stdout + done.stderr, 3)}")
        progress(f"base image {ref} made in {time.monotonic() - started:.0f} s")
    return ref


# --------------------------------------------------------------------------- the wheelhouse


def requirements_of(context: Path) -> list[Path]:
    """A build context's requirements files that exist, in install order."""
    return [context / rel for rel in REQUIREMENTS_FILES if (context / rel).is_file()]


def wheelhouse_key(files: Sequence[Path], python: str = IMAGE_PYTHON) -> str:
    digest = hashlib.sha256(f"python{python}\n".encode())
    for path in files:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _requirement_lines(files: Sequence[Path]) -> list[str]:
    lines = []
    for path in files:
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def _pip_config_mounts() -> tuple[list[str], list[str]]:
    """`--volume` and `--env` arguments that give pip in a container the host's pip configuration: its
    config files, PIP_* variables, and every local path they name (file:// indexes, find-links,
    constraints, CA bundles), read-only at the same place."""
    home = Path.home()
    files = [p for p in (Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), home / ".config/pip/pip.conf",
                         home / ".pip/pip.conf") if p.is_file()]
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    text = "\n".join([*(p.read_text(errors="replace") for p in files), *env.values()])
    named = {Path(m) for m in re.findall(r"(?:file://)?(/[^\s'\",;]+)", text)}
    # a PEP 503 index folder (`.../simple`) links its files relative to it, beside it
    named = {p.parent if p.name == "simple" else p for p in named}
    mounts = sorted({*files, *(p for p in named if p.exists())})
    volumes = [arg for p in mounts for arg in ("--volume", f"{p}:{p}:ro")]
    return volumes, [arg for k, v in sorted(env.items()) for arg in ("--env", f"{k}={v}")]


def ensure_wheelhouse(files: Sequence[Path], cfg: Settings | None = None, *, engine: Engine | None = None,
                      image: str | None = None, progress: Progress = _noop) -> Path:
    """`.state/wheelhouse/<hash of the files>/`: every wheel these requirements need in the image, made
    once. pip runs inside `image` (the base image, with the engine) with the host's pip configuration,
    so environment markers are those of the image's own Python (bookworm's 3.11.2 needs wheels a host's
    3.11.7 does not, e.g. redis' async-timeout); without an engine, pip on the host."""
    cfg = cfg or settings()
    root = cfg.state_dir / "wheelhouse"
    target = root / wheelhouse_key(files, image or IMAGE_PYTHON)
    done_marker = target / ".complete"
    if done_marker.exists():
        return target
    with file_lock(root / f".{target.name}.lock"):
        if done_marker.exists():
            return target
        lines = _requirement_lines(files)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        if lines:
            progress(f"wheelhouse {target.name}: {len(lines)} requirements, pip in {image or 'the host'}")
            (target / "requirements.in").write_text("\n".join(lines) + "\n")
            if engine is not None and image is not None:
                volumes, env = _pip_config_mounts()
                argv = engine.run_command("--rm", "--network", "host", "--user", "0:0", *volumes, *env,
                                          "--volume", f"{target}:/wheelhouse", image, "sh", "-c",
                                          "python3 -m venv /tmp/pip && /tmp/pip/bin/pip wheel --no-cache-dir"
                                          " --disable-pip-version-check --wheel-dir /wheelhouse"
                                          " -r /wheelhouse/requirements.in")
            else:
                argv = [sys.executable, "-m", "pip", "wheel", "--wheel-dir", str(target),
                        "-r", str(target / "requirements.in")]
            result = _run(argv, timeout=1800, progress=lambda line: progress(f"  {line}"))
            if result.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                raise RuntimeError(f"pip could not make the wheelhouse: {_tail(result.stdout, 3)}")
            (target / "requirements.in").unlink()
        done_marker.write_text("")
    return target
