"""Publish builds the version's image: a durable queue on the version's own catalog row.

States (migrations/011_version_builds.sql): publish sets `queued` in its own transaction when a
builder is configured (CS_BUILDER); a worker claims the oldest with `FOR UPDATE SKIP LOCKED`
(`building`, with a lease, so a build whose worker died is claimed again once the lease ends), then
`built` with the image ref, or back to `queued` while attempts remain (CS_BUILD_ATTEMPTS), else
`failed` with the build log. Every end leaves an audit row (action `build`). `retry()` queues a
failed build again. No builder (`none`): nothing is queued and publish and execute stay as they were.

Until a version is built, its function is not deployed: `require_built()` answers 503 `building`
with Retry-After (or 409 `build_failed`), and `Invoker.function_for` asks it once per version and
process (built is final).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from customscripts import logs
from customscripts.config import Settings, settings
from customscripts.errors import Conflict, Unavailable
from customscripts.faas.builder import Builder, BuildFailed, BuildOutcome, builder_for

log = logs.get("customscripts.faas.buildqueue")

QUEUED, BUILDING, BUILT, FAILED = "queued", "building", "built", "failed"
Progress = Callable[[str], None]
# (script_id, version) -> the version's build context and the image it is built into
ContextFor = Callable[[str, int], tuple[Path, str]]


@dataclass(frozen=True)
class BuildState:
    script_id: str
    version: int
    status: str
    image: str | None
    log: str | None
    attempts: int
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    def as_json(self, *, with_log: bool) -> dict[str, Any]:
        """What the version's GET shows; the log only to the owner (it names files of the context)."""
        out: dict[str, Any] = {
            "status": self.status, "image": self.image, "attempts": self.attempts,
            **{k: (v.isoformat() if v else None) for k, v in (("queued_at", self.queued_at),
                                                              ("started_at", self.started_at),
                                                              ("finished_at", self.finished_at))}}
        if with_log:
            out["log"] = self.log
        return out


_SELECT = ("SELECT script_id, version, build_status, build_image, build_log, build_attempts, build_queued_at,"
           " build_started_at, build_finished_at FROM script_versions ")


def enqueue(conn: psycopg.Connection, script_id: str, version: int, cfg: Settings | None = None) -> bool:
    """Queue the version's build in the caller's transaction (publish); False when no builder is set."""
    cfg = cfg or settings()
    if cfg.builder.strip().lower() in ("", "none"):
        return False
    return _queue(conn, script_id, version)


def _queue(conn: psycopg.Connection, script_id: str, version: int) -> bool:
    """The version's build back to `queued`, from any state; False when there is no such version."""
    row = conn.execute("UPDATE script_versions SET build_status = 'queued', build_queued_at = now(),"
                       " build_attempts = 0, build_started_at = NULL, build_finished_at = NULL,"
                       " build_lease_until = NULL"
                       " WHERE script_id = %s AND version = %s RETURNING 1", (script_id, version)).fetchone()
    return row is not None


class BuildQueue:
    """The build states of versions; `audit(...)` is the catalog's audit writer (rows of action `build`)."""

    def __init__(self, pool: Any, cfg: Settings | None = None,
                 audit: Callable[..., None] | None = None) -> None:
        self.pool = pool
        self.cfg = cfg or settings()
        self.audit = audit
        self._built: set[tuple[str, int]] = set()  # final: never asked again in this process

    def state(self, script_id: str, version: int) -> BuildState | None:
        """The version's build, None when none is tracked (no builder, or published before one was set)."""
        with self.pool.connection() as conn:
            row = conn.execute(_SELECT + "WHERE script_id = %s AND version = %s AND build_status IS NOT NULL",
                               (script_id, version)).fetchone()
        return BuildState(*row) if row else None

    def require_built(self, script_id: str, version: int) -> None:
        """503 `building` (Retry-After) until the image exists, 409 `build_failed` when it could not be built."""
        if (script_id, version) in self._built:
            return
        found = self.state(script_id, version)
        if found is None or found.status == BUILT:
            self._built.add((script_id, version))
            return
        if found.status == FAILED:
            raise Conflict(f"the image of {script_id}@{version} could not be built; its build log is on the "
                           "version (GET /scripts/{id}/versions/{n})", code="build_failed",
                           details={"build": found.as_json(with_log=False)})
        retry = max(1, self.cfg.build_retry_after_s)
        raise Unavailable(f"the image of {script_id}@{version} is being built ({found.status})",
                          code="building", details={"build": found.as_json(with_log=False)},
                          retry_after_s=retry)

    def claim(self) -> BuildState | None:
        """The oldest queued build (or one whose worker's lease ran out), now `building` for this worker."""
        lease_s = self.cfg.build_timeout_s + 60
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "UPDATE script_versions SET build_status = 'building', build_started_at = now(),"
                " build_attempts = build_attempts + 1, build_lease_until = now() + make_interval(secs => %s)"
                " WHERE (script_id, version) = (SELECT script_id, version FROM script_versions"
                "   WHERE build_status = 'queued' OR (build_status = 'building'"
                "     AND coalesce(build_lease_until < now(), true))"
                "   ORDER BY build_queued_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING script_id, version, build_status, build_image, build_log, build_attempts,"
                " build_queued_at, build_started_at, build_finished_at", (lease_s,)).fetchone()
        return BuildState(*row) if row else None

    def _owner(self, conn: psycopg.Connection, script_id: str) -> tuple[str, str]:
        row = conn.execute("SELECT owner_id, tenant FROM scripts WHERE script_id = %s", (script_id,)).fetchone()
        return (row[0], row[1]) if row else ("", "")

    def finish(self, claim: BuildState, outcome: BuildOutcome) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("UPDATE script_versions SET build_status = 'built', build_image = %s, build_log = %s,"
                         " build_finished_at = now(), build_lease_until = NULL WHERE script_id = %s AND version = %s",
                         (outcome.image, outcome.log, claim.script_id, claim.version))
            self._audit(conn, claim, "built", f"{outcome.image} in {outcome.duration_s:.1f} s")
        logs.event(log, "image built", script_id=claim.script_id, version=claim.version, image=outcome.image,
                   seconds=round(outcome.duration_s, 1))

    def fail(self, claim: BuildState, error: BuildFailed) -> str:
        """Back to `queued` while attempts remain, else `failed`; the status it is left in."""
        status = QUEUED if claim.attempts < max(1, self.cfg.build_attempts) else FAILED
        text = f"{error}\n{error.log}".strip()
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("UPDATE script_versions SET build_status = %s, build_log = %s, build_lease_until = NULL,"
                         " build_finished_at = CASE WHEN %s = 'failed' THEN now() END"
                         " WHERE script_id = %s AND version = %s",
                         (status, text, status, claim.script_id, claim.version))
            self._audit(conn, claim, "failed" if status == FAILED else "retrying", str(error)[:500])
        logs.event(log, "image build failed", script_id=claim.script_id, version=claim.version,
                   attempt=claim.attempts, now=status, error=str(error)[:300])
        return status

    def retry(self, script_id: str, version: int) -> bool:
        """Queue a failed build again (attempts start over); False when it was not failed."""
        with self.pool.connection() as conn, conn.transaction():
            state = conn.execute("SELECT build_status FROM script_versions WHERE script_id = %s AND version = %s"
                                 " FOR UPDATE", (script_id, version)).fetchone()
            return bool(state and state[0] == FAILED and _queue(conn, script_id, version))

    def _audit(self, conn: psycopg.Connection, claim: BuildState, status: str, detail: str) -> None:
        if self.audit is None:
            return
        owner, tenant = self._owner(conn, claim.script_id)
        self.audit(action="build", script_id=claim.script_id, version=claim.version, user_id=owner,
                   tenant=tenant, status=status, detail=detail[:500], conn=conn)


class BuildWorker:
    """Drains the queue: claim, render the context, build, record. One build at a time per process;
    `kick()` starts a daemon thread when none is draining (publish calls it after committing)."""

    def __init__(self, queue: BuildQueue, builder: Builder, context_for: ContextFor,
                 progress: Progress | None = None) -> None:
        self.queue = queue
        self.builder = builder
        self.context_for = context_for
        self.progress = progress or (lambda line: None)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run_once(self) -> BuildState | None:
        """Build one queued version; the claim it worked on, None when the queue was empty."""
        claim = self.queue.claim()
        if claim is None:
            return None
        try:
            context, image = self.context_for(claim.script_id, claim.version)
            outcome = self.builder.build(context, image, progress=self.progress)
        except BuildFailed as exc:
            self.queue.fail(claim, exc)
        except Exception as exc:
            self.queue.fail(claim, BuildFailed(f"{type(exc).__name__}: {exc}"))
        else:
            self.queue.finish(claim, outcome)
        return claim

    def drain(self, limit: int = 1000) -> int:
        """Build until the queue is empty (or `limit` builds); how many were attempted."""
        done = 0
        with self._lock:
            while done < limit and self.run_once() is not None:
                done += 1
        return done

    def kick(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._drain_logged, name="build-worker", daemon=True)
        self._thread.start()

    def _drain_logged(self) -> None:
        try:
            self.drain()
        except Exception as exc:
            logs.event(log, "build worker stopped", error=str(exc)[:300])


def version_context(registry: Any) -> ContextFor:
    """A ContextFor over the registry: the version's rendered context (build.render_context) and its image."""
    from customscripts.faas.build import image_ref, render_context

    def context_for(script_id: str, version: int) -> tuple[Path, str]:
        meta, source = registry.load_version(script_id, version)
        built = render_context(script_id, version, source, meta.model_dump(mode="json"))
        return built.path, image_ref(built.name, built.code_sha256)

    return context_for


_workers: dict[int, BuildWorker] = {}
_workers_lock = threading.Lock()


def worker_for(registry: Any, cfg: Settings | None = None) -> BuildWorker | None:
    """This process's worker over `registry` (None without a builder, or when a dedicated worker drains
    the queue: CS_BUILD_WORKER=off): publish kicks it."""
    cfg = cfg or settings()
    if cfg.build_worker.strip().lower() == "off":
        return None
    builder = builder_for(cfg)
    if builder is None:
        return None
    with _workers_lock:
        worker = _workers.get(id(registry))
        if worker is None:
            queue = getattr(registry, "builds", None) or BuildQueue(registry.catalog.pool, cfg,
                                                                     audit=registry.catalog.audit)
            worker = _workers[id(registry)] = BuildWorker(queue, builder, version_context(registry))
        return worker


def build_versions(registry: Any, builder: Builder, versions: list[tuple[str, int]] | None, *,
                   force: bool = False, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Queue these versions' builds (None: every published version not built yet; `force`: built ones
    too) and build them now, in this process, through the same states publish uses."""
    queue: BuildQueue = getattr(registry, "builds", None) or BuildQueue(registry.catalog.pool, registry.cfg,
                                                                          audit=registry.catalog.audit)
    with queue.pool.connection() as conn, conn.transaction():
        if versions is None:
            rows = conn.execute("SELECT script_id, version FROM script_versions WHERE status = 'published'"
                                + ("" if force else " AND build_status IS DISTINCT FROM 'built'")
                                + " ORDER BY script_id, version").fetchall()
            versions = [(r[0], r[1]) for r in rows]
        for script_id, version in versions:
            if not _queue(conn, script_id, version):
                raise LookupError(f"no published version {script_id}@{version}")
    worker = BuildWorker(queue, builder, version_context(registry), progress)
    worker.drain(limit=len(versions) * max(1, queue.cfg.build_attempts) + 1)
    results = []
    for script_id, version in versions:
        state = queue.state(script_id, version)
        result: dict[str, Any] = {"script_id": script_id, "version": version,
                                  "status": state.status if state else "unknown",
                                  "image": state.image if state else None}
        if state is not None and state.status == FAILED:
            result["log"] = (state.log or "")[-4000:]
        results.append(result)
    return results


def serve_worker(registry: Any, builder: Builder, *, poll_s: float, stop: threading.Event,
                 progress: Progress | None = None) -> None:
    """The dedicated worker (`customscripts build --worker`): drain, wait `poll_s`, again, until `stop`.
    Several replicas share the queue (claims skip each other's rows)."""
    worker = BuildWorker(getattr(registry, "builds", None) or BuildQueue(registry.catalog.pool, registry.cfg,
                                                                         audit=registry.catalog.audit),
                         builder, version_context(registry), progress)
    while not stop.is_set():
        try:
            worker.drain()
        except (psycopg.Error, OSError) as exc:  # the database away for a moment: the next round resumes
            logs.event(log, "build worker round failed", error=str(exc)[:300])
        stop.wait(poll_s)
