"""The local stack: real PostgreSQL, Redis, NATS JetStream and an S3 server as local processes.

Each service runs on its own configurable port, keeps its data under the state folder (so data
survives `down` then `up`), and is recorded in a pid file so `down` stops only what `up` started.
Missing Debian packages are installed on the way up.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from customscripts import logs
from customscripts.config import REPO_ROOT, STACK_SECRETS_DIR, Settings, settings

log = logs.get("customscripts.local.stack")

DEBIAN_PACKAGES = {
    "postgresql": "postgresql",
    "redis-server": "redis-server",
    "nats-server": "nats-server",
    "bwrap": "bubblewrap",
}


def say(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


# --------------------------------------------------------------------------- packages


def _pg_bindir() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def missing_packages() -> list[str]:
    missing = []
    for binary, package in DEBIAN_PACKAGES.items():
        if binary == "postgresql":
            if _pg_bindir() is None:
                missing.append(package)
        elif shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            missing.append(package)
    return missing


def ensure_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing Debian packages {missing}; run: sudo apt-get install -y {' '.join(missing)}")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


# --------------------------------------------------------------------------- services


@dataclass
class Service:
    name: str
    port: int
    start: Callable[[Settings, Path], list[str]]  # returns argv
    ready: Callable[[Settings], bool]
    prepare: Callable[[Settings, Path], None] | None = None
    run_as: str | None = None  # system user the process must run as (PostgreSQL refuses root)
    optional: bool = False  # started only when named in `up(only=...)` (e.g. the realtime scheduler)
    env: Callable[[Settings], dict[str, str]] | None = None  # added to the inherited environment


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _pg_prepare(cfg: Settings, data: Path) -> None:
    bindir = _pg_bindir()
    assert bindir is not None
    pgdata = data / "pgdata"
    if (pgdata / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    pwfile = data / "pwfile"
    pwfile.write_text(cfg.pg_password + "\n")
    user = _pg_system_user()
    if user:
        shutil.chown(data, user)
        shutil.chown(pwfile, user)
    say("initialising PostgreSQL cluster")
    _run_as(
        [str(bindir / "initdb"), "-D", str(pgdata), "-U", cfg.pg_user, "--pwfile", str(pwfile),
         "-A", "scram-sha-256", "-E", "UTF8", "--no-locale"],
        user,
    )
    pwfile.unlink()
    with open(pgdata / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# customscripts local stack\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{data}'\n"
            "max_connections = 200\n"
            "shared_buffers = 256MB\n"
            "synchronous_commit = on\n"
            "fsync = on\n"
        )


def _pg_system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--home", "/var/lib/postgresql", "postgres"], check=True)
    return "postgres"


def _run_as(argv: list[str], user: str | None) -> None:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _pg_start(cfg: Settings, data: Path) -> list[str]:
    bindir = _pg_bindir()
    assert bindir is not None
    # synchronous_commit on the command line too: clusters made when the local default was `off` get the
    # safe default without being re-initialised (a commit that returned is on disk; README "Durability")
    return [str(bindir / "postgres"), "-D", str(data / "pgdata"), "-p", str(cfg.pg_port),
            "-c", "synchronous_commit=on"]


def _pg_ready(cfg: Settings) -> bool:
    import psycopg

    try:
        with psycopg.connect(cfg.pg_dsn.replace(f"dbname={cfg.pg_db}", "dbname=postgres"), connect_timeout=1):
            return True
    except psycopg.Error:
        return False


def _redis_start(cfg: Settings, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    return [
        server, "--bind", "127.0.0.1", "--port", str(cfg.redis_port), "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
        "--protected-mode", "yes", "--logfile", "",
    ]


def _redis_ready(cfg: Settings) -> bool:
    import redis

    try:
        return bool(redis.Redis(host=cfg.redis_host, port=cfg.redis_port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _nats_start(cfg: Settings, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    server = shutil.which("nats-server") or "/usr/bin/nats-server"
    return [
        server, "-a", "127.0.0.1", "-p", str(cfg.nats_port), "-m", str(cfg.nats_monitor_port),
        "-js", "-sd", str(data), "-n", "customscripts-local",
    ]


def _nats_ready(cfg: Settings) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.nats_monitor_port}/healthz?js-enabled-only=true",
                                    timeout=0.5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _s3_start(cfg: Settings, data: Path) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    port = int(cfg.s3_endpoint.rsplit(":", 1)[1])
    config = data / "s3.json"
    config.write_text(json.dumps({
        "identities": [{
            "name": "customscripts",
            "credentials": [{"accessKey": cfg.s3_access_key, "secretKey": cfg.s3_secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]
    }))
    config.chmod(0o600)
    base = port + 1  # every other SeaweedFS port sits just above the S3 port
    return [
        weed, "mini", f"-dir={data / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={port}", f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}",
        f"-admin.port={base + 3}", f"-s3.port.iceberg={base + 4}", f"-s3.port.lance={base + 5}",
        f"-master.port.grpc={base + 10001}", f"-volume.port.grpc={base + 10002}",
        f"-filer.port.grpc={base + 10003}", f"-s3.port.grpc={base + 10004}", f"-admin.port.grpc={base + 10005}",
        "-admin.ui=false", "-webdav=false", f"-s3.config={config}", "-master.telemetry=false",
        f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}",
    ]


def _s3_ready(cfg: Settings) -> bool:
    from minio import Minio

    if not _port_open(int(cfg.s3_endpoint.rsplit(":", 1)[1])):
        return False
    try:
        client = Minio(cfg.s3_endpoint, access_key=cfg.s3_access_key, secret_key=cfg.s3_secret_key,
                       secure=cfg.s3_secure)
        if not client.bucket_exists(cfg.s3_bucket):
            client.make_bucket(cfg.s3_bucket)
        return True
    except Exception:
        return False


def _provider_start(cfg: Settings, data: Path) -> list[str]:
    return [sys.executable, "-m", "customscripts.local.provider", "--host", cfg.provider_host,
            "--port", str(cfg.provider_port)]


def _provider_ready(cfg: Settings) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{cfg.provider_host}:{cfg.provider_port}/healthz", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def scheduler_port(cfg: Settings) -> int:
    """Where the local scheduler serves /metrics, /healthz and /readyz."""
    return cfg.scheduler_metrics_port or 9464


def _scheduler_start(cfg: Settings, data: Path) -> list[str]:
    return [sys.executable, "-m", "customscripts.realtime.scheduler", "--metrics-port", str(scheduler_port(cfg))]


def _scheduler_env(cfg: Settings) -> dict[str, str]:
    """The scheduler shares the function slots with registry-fn: the same budget and tenant share."""
    from customscripts.faas.build import stack_deployments

    registry = next(b for b in stack_deployments(local=False) if b["service"] == "registry-fn")["envVars"]
    return {k: registry[k] for k in ("CS_FUNCTION_BUDGET", "CS_FUNCTION_TENANT_SHARE") if k in registry}


def _scheduler_ready(cfg: Settings) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{scheduler_port(cfg)}/healthz", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


INFRA = ("postgres", "redis", "nats", "s3")


def services(cfg: Settings) -> list[Service]:
    return [
        Service("postgres", cfg.pg_port, _pg_start, _pg_ready, _pg_prepare, run_as="postgres"),
        Service("redis", cfg.redis_port, _redis_start, _redis_ready),
        Service("nats", cfg.nats_port, _nats_start, _nats_ready),
        Service("s3", int(cfg.s3_endpoint.rsplit(":", 1)[1]), _s3_start, _s3_ready),
        Service("provider", cfg.provider_port, _provider_start, _provider_ready),
        # the realtime scheduler: `customscripts up --only scheduler` (not part of a plain `up`)
        Service("scheduler", scheduler_port(cfg), _scheduler_start, _scheduler_ready, optional=True,
                env=_scheduler_env),
    ]


# --------------------------------------------------------------------------- lifecycle


def _pidfile(cfg: Settings, name: str) -> Path:
    return cfg.state_dir / "run" / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def running_pid(cfg: Settings, name: str) -> int | None:
    path = _pidfile(cfg, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def start_service(cfg: Settings, svc: Service, timeout: float = 60.0) -> None:
    data = cfg.state_dir / svc.name
    if running_pid(cfg, svc.name) and svc.ready(cfg):
        say(f"{svc.name:8} already running on :{svc.port}")
        return
    if _port_open(svc.port):
        if svc.ready(cfg):
            say(f"{svc.name:8} answering on :{svc.port} (not started by this stack; leaving it alone)")
            return
        raise SystemExit(f"port {svc.port} for {svc.name} is taken by another program; set its CS_*_PORT")
    if svc.prepare:
        svc.prepare(cfg, data)
    argv = svc.start(cfg, data)
    user = svc.run_as if os.geteuid() == 0 else None
    if user:
        _pg_system_user()
        argv = ["runuser", "-u", user, "--", *argv]
    (cfg.state_dir / "run").mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / "logs").mkdir(parents=True, exist_ok=True)
    logfile = open(cfg.state_dir / "logs" / f"{svc.name}.log", "ab")  # noqa: SIM115 - handed to the child
    env = {**os.environ, **svc.env(cfg)} if svc.env else None
    proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(cfg.state_dir), env=env)
    logfile.close()
    _pidfile(cfg, svc.name).write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (cfg.state_dir / "logs" / f"{svc.name}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"{svc.name} exited with {proc.returncode} while starting:\n{tail}")
        if svc.ready(cfg):
            say(f"{svc.name:8} up on 127.0.0.1:{svc.port} (pid {proc.pid})")
            return
        time.sleep(0.2)
    raise SystemExit(f"{svc.name} did not become healthy within {timeout:.0f}s; see {cfg.state_dir}/logs")


def stop_service(cfg: Settings, name: str, timeout: float = 30.0) -> bool:
    pid = running_pid(cfg, name)
    if pid is None:
        _pidfile(cfg, name).unlink(missing_ok=True)
        return False
    # PostgreSQL: SIGINT is its "fast shutdown"; everything else takes SIGTERM.
    os.killpg(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    _pidfile(cfg, name).unlink(missing_ok=True)
    say(f"{name:8} stopped")
    return True


def bootstrap_database(cfg: Settings) -> None:
    """Create the database and apply migrations (idempotent), saying which were applied."""
    from customscripts import db

    for name in db.create_and_migrate(cfg):
        say(f"migration applied: {name}")


# Secrets each local stack makes for itself at its first `up` (config.secret() reads them).
STACK_SECRETS = ("basic-auth-password",)  # the provider's /system API (OpenFaaS's basic-auth secret)


def ensure_stack_secrets(cfg: Settings) -> None:
    """Generate the stack's own random secrets once, kept across down/up: `<state>/secrets/<name>`,
    mode 0600 in a 0700 folder, written without following links. A file that is not a regular file of
    this user is refused rather than trusted."""
    folder = cfg.state_dir / STACK_SECRETS_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    for name in STACK_SECRETS:
        path = folder / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise SystemExit(f"{path} is not a regular file owned by this user; remove it") from None
            if stat.S_IMODE(info.st_mode) != 0o600:
                os.chmod(path, 0o600)
            if path.read_text().strip():
                continue  # kept across down/up
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        say(f"secret {name} generated in {path} (mode 0600)")


def stack_environment(cfg: Settings, orchestration: str = "process") -> dict[str, str]:
    """The environment stack.yml is substituted with locally, as an operator exports it before `faas-cli
    deploy`: the local endpoints the platform functions need (they get nothing else of this process's
    environment), unless set explicitly. `orchestration` is how the provider runs functions (its
    /system/info)."""
    local = {
        "CS_FUNCTIONS_GATEWAY": cfg.provider_url,
        "CS_GATEWAY_URL": cfg.data_gateway_url,
        "CS_FUNCTIONS_DIR": str(cfg.functions_dir),
        "CS_REGISTRY_URL": cfg.registry_url,
        # inside an image there is no bubblewrap: the container runtime runs script functions as production
        # does, with the sandbox's `process` isolation inside the container's own layers
        "CS_ISOLATION": "process" if orchestration == "container" else cfg.isolation_mode,
    }
    return {**os.environ, **{k: v for k, v in local.items() if not os.environ.get(k)}}


def deploy_platform(cfg: Settings) -> None:
    """Render stack.yml's platform functions and deploy them to the provider, as `faas-cli up` would, then
    start each: its first start builds its environment or image, which could outlast a caller's timeout."""
    import requests

    from customscripts.faas.build import stack_deployments
    from customscripts.faas.client import OpenFaaSClient

    with OpenFaaSClient(cfg.provider_url) as client:
        orchestration = str((client.info().get("provider") or {}).get("orchestration") or "process")
        names = []
        for body in stack_deployments(environ=stack_environment(cfg, orchestration)):
            client.deploy(body)
            names.append(body["service"])
    for name in names:
        say(f"function {name} deployed at {cfg.provider_url}/function/{name}; starting it")
        resp = requests.get(f"{cfg.provider_url}/function/{name}/healthz", timeout=PLATFORM_START_TIMEOUT_S)
        if resp.status_code >= 500 and "Can't reach service" in resp.text:  # the provider's words (OpenFaaS')
            raise RuntimeError(f"function {name} did not start: {resp.text.strip()[:500]}")


PLATFORM_START_TIMEOUT_S = 900.0


def up(cfg: Settings | None = None, only: set[str] | None = None) -> None:
    """Start the services (all, or `only` these), migrate, and deploy the platform functions."""
    cfg = cfg or settings()
    ensure_packages()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_stack_secrets(cfg)
    for svc in services(cfg):
        if (only is None and not svc.optional) or (only is not None and svc.name in only):
            start_service(cfg, svc)
        if svc.name == "postgres" and (only is None or "postgres" in only):
            bootstrap_database(cfg)
    if only is None or "provider" in only:
        deploy_platform(cfg)


def down(cfg: Settings | None = None, only: set[str] | None = None) -> None:
    cfg = cfg or settings()
    names = [svc.name for svc in services(cfg)]
    extra = sorted(p.stem for p in (cfg.state_dir / "run").glob("*.pid") if p.stem not in names)
    for name in [*extra, *reversed(names)]:
        if only is None or name in only:
            stop_service(cfg, name)


def status(cfg: Settings | None = None) -> dict[str, dict[str, object]]:
    cfg = cfg or settings()
    report: dict[str, dict[str, object]] = {}
    for svc in services(cfg):
        pid = running_pid(cfg, svc.name)
        if svc.optional and pid is None:
            continue  # an optional service that is not running is not unhealthy
        report[svc.name] = {"port": svc.port, "pid": pid, "healthy": svc.ready(cfg)}
    return report


def repo_root() -> Path:
    return REPO_ROOT
