"""The registry's operations: drafts, publishing, reads, marketplace subscriptions, closures.

Order inside every operation: tier gate (403) → ids (422) → existence/visibility (404) →
entitlement (403) → validation (413/422) → writes. Nothing is written before all checks pass.
Another tenant's private script answers 404 exactly like a missing one; a same-tenant caller
without entitlement gets 403. Script ids are per tenant (registry/namespace.py): `resolve` turns
the id a caller gives into the platform-wide id, looking only in the caller's own namespace. A
version is usable only under its script's current policy (permissions.py, rule 7).
"""

from __future__ import annotations

import hashlib
from typing import Any

from customscripts import ids
from customscripts.auth import Principal
from customscripts.config import Settings, settings
from customscripts.errors import Conflict, Forbidden, Invalid, NotFound
from customscripts.faas import buildqueue
from customscripts.permissions import (
    Denied,
    check_can_list,
    check_can_use,
    check_can_use_now,
    check_dependency_closure,
    is_owner,
    tier_of,
)
from customscripts.registry import namespace, validation
from customscripts.registry.catalog import Catalog, ScriptRow, VersionRow
from customscripts.registry.models import (
    DraftCreate,
    DraftUpdate,
    ScriptMeta,
    now,
    parse_dependency,
    sha256_text,
)
from customscripts.registry.store import DRAFT, ScriptStore

Version = int | str  # a published number or "draft"


# Closures of published versions kept per process (each a handful of pairs); cleared when full.
CLOSURE_CACHE_SIZE = 4096
# GET /scripts reads at most this many chunks of candidates per page before answering with a cursor.
LISTING_MAX_CHUNKS = 20


def parse_version(value: object) -> Version:
    return DRAFT if value == DRAFT else ids.version(value)


def _not_found(script_id: str) -> NotFound:
    return NotFound(f"script {script_id} not found", code="script_not_found")


class RegistryService:
    def __init__(self, cfg: Settings | None = None, store: ScriptStore | None = None,
                 catalog: Catalog | None = None) -> None:
        self.cfg = cfg or settings()
        self.store = store or ScriptStore(self.cfg)
        self.catalog = catalog or Catalog(self.cfg)
        self.builds = buildqueue.BuildQueue(self.catalog.pool, self.cfg, audit=self.catalog.audit)
        self._closures: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {}

    # ----------------------------------------------------------------- helpers

    def resolve(self, principal: Principal, script_id: object) -> str:
        """The platform-wide id a caller means: their own tenant's script `X-<tag>` when they give
        its bare chosen id `X`, else the id as given. Only the caller's namespace is looked in, so
        the answer never depends on what other tenants have."""
        sid = ids.script_id(script_id)
        if namespace.is_own(sid, principal.tenant) or len(sid) > namespace.MAX_CHOSEN_ID:
            return sid
        own = sid + namespace.tenant_suffix(principal.tenant)
        row = self.catalog.scripts.get(own)
        return own if row is not None and row.tenant == principal.tenant else sid

    def _resolve_dependencies(self, principal: Principal, depends_on: list[str]) -> list[str]:
        """`depends_on` entries with each script id resolved as `resolve` does (stored that way)."""
        out = []
        for dep in depends_on:
            sid, version = parse_dependency(dep)
            out.append(f"{self.resolve(principal, sid)}@{version}")
        return out

    def _current(self, script_ids: set[str], known: ScriptRow | None = None) -> dict[str, VersionRow]:
        """Each script's latest published version: its current access policy (permissions rule 7).
        Script rows come from the ScriptCache, version rows from the version cache."""
        pairs = []
        for sid in sorted(script_ids):
            row = known if known is not None and known.script_id == sid else self.catalog.scripts.get(sid)
            if row is not None and row.latest_version:
                pairs.append((sid, row.latest_version))
        rows = self.catalog.get_versions(pairs)
        return {sid: rows[(sid, ver)] for sid, ver in pairs if (sid, ver) in rows}

    def visible_script(self, principal: Principal, script_id: str, *, cached: bool = False) -> ScriptRow:
        """The catalog row, or 404 if it does not exist or is another tenant's private script (never a
        403 or 409 that would reveal it exists): the one visibility check. `cached`: from the
        ScriptCache (the execute path, which reads it once per call)."""
        sid = ids.script_id(script_id)
        row = self.catalog.scripts.get(sid) if cached else self.catalog.get_script(sid)
        if row is None:
            raise _not_found(script_id)
        return self._visible(principal, row)

    @staticmethod
    def latest_published(row: ScriptRow) -> int:
        """The script's latest published version (409 `not_published` for a draft-only script)."""
        if not row.latest_version:
            raise Conflict(f"script {row.script_id} has no published version", code="not_published")
        return row.latest_version

    def _script(self, principal: Principal, script_id: str) -> ScriptRow:
        return self.visible_script(principal, script_id)

    @staticmethod
    def _visible(principal: Principal, row: ScriptRow) -> ScriptRow:
        if row.tenant != principal.tenant and not row.marketplace:
            raise _not_found(row.script_id)
        return row

    def _owned(self, principal: Principal, script_id: str) -> ScriptRow:
        row = self._script(principal, script_id)
        if not is_owner(principal, row):
            if row.tenant != principal.tenant:
                raise _not_found(script_id)
            raise Forbidden(f"only the owner may change script {script_id}", code="not_owner")
        return row

    def _subscribed(self, principal: Principal, script_ids: list[str]) -> set[str]:
        return self.catalog.subscribed_scripts(principal.user_id, principal.tenant, script_ids)

    def _check(self, principal: Principal, target: VersionRow) -> None:
        """check_can_use_now with the caller's live subscription; hidden denials become 404."""
        subscribed = bool(self._subscribed(principal, [target.script_id]))
        current = self._current({target.script_id}).get(target.script_id)
        try:
            check_can_use_now(principal, target, current, subscribed=subscribed, cfg=self.cfg)
        except Denied as exc:
            if exc.hidden:
                raise _not_found(target.script_id) from None
            raise

    def _audit(self, principal: Principal, action: str, script_id: str, version: int | None,
               call_id: str | None, conn: Any = None) -> None:
        self.catalog.audit(action=action, script_id=script_id, version=version, user_id=principal.user_id,
                           tenant=principal.tenant, status="ok", call_id=call_id, conn=conn)

    def _validate(self, principal: Principal, script_id: str, source: str, meta: ScriptMeta) -> None:
        if meta.permissions.marketplace:
            check_can_list(principal, self.cfg)  # 403 before any validation work
        validation.check_source(source)
        validation.check_schema(meta.input_schema, "input_schema")
        validation.check_schema(meta.output_schema, "output_schema")
        validation.check_limits(meta.limits, tier_of(principal, self.cfg))
        deps = [parse_dependency(d)[0] for d in meta.depends_on]
        subs = self._subscribed(principal, deps)
        validation.check_dependencies(self.catalog, principal, script_id, list(meta.depends_on),
                                      subscribed=subs.__contains__, cfg=self.cfg)

    # ----------------------------------------------------------------- drafts

    def create_draft(self, principal: Principal, body: DraftCreate, call_id: str | None = None) -> ScriptMeta:
        tier = tier_of(principal, self.cfg)
        script_id = (namespace.qualify(body.script_id, principal.tenant) if body.script_id
                     else namespace.new_script_id(principal.tenant))
        stamp = now()
        meta = ScriptMeta(
            script_id=script_id, version=DRAFT, owner_id=principal.user_id, tenant=principal.tenant,
            name=body.name, description=body.description, runtime_mode=body.runtime_mode,
            permissions=body.permissions, input_schema=body.input_schema, output_schema=body.output_schema,
            depends_on=self._resolve_dependencies(principal, body.depends_on), created_at=stamp, updated_at=stamp,
            status="draft",
            code_sha256=_code_sha(body.source), limits=body.limits, tier=principal.tier,
        )
        self._validate(principal, script_id, body.source, meta)
        with self.catalog.transaction() as conn:
            if self.catalog.count_owned(conn, principal.tenant, principal.user_id) >= tier.max_scripts:
                raise Forbidden(f"tier {tier.name!r} allows at most {tier.max_scripts} scripts",
                                code="script_quota_exceeded", details={"max_scripts": tier.max_scripts})
            if not self.catalog.insert_script(conn, meta):  # only ever by the caller's own tenant
                raise Conflict(f"script id {script_id} is already taken in your tenant", code="script_id_taken")
            self.store.put_draft(meta, body.source)
            self._audit(principal, "create_draft", script_id, None, call_id, conn)
        return meta

    def update_draft(self, principal: Principal, script_id: str, body: DraftUpdate,
                     call_id: str | None = None) -> ScriptMeta:
        tier_of(principal, self.cfg)
        row = self._owned(principal, script_id)
        with self.catalog.transaction() as conn:
            self.catalog.get_script(row.script_id, conn, for_update=True)
            current = self.store.get_meta(row.owner_id, row.script_id, DRAFT)
            source = self.store.get_source(row.owner_id, row.script_id, DRAFT)
            changes = {k: getattr(body, k) for k in body.model_fields_set if k != "source"}
            if "source" in body.model_fields_set and body.source is not None:
                source = body.source
            changes = {k: v for k, v in changes.items() if v is not None or k == "limits"}
            if "depends_on" in changes:
                changes["depends_on"] = self._resolve_dependencies(principal, changes["depends_on"])
            merged = current.model_dump() | changes
            merged.update(updated_at=now(), code_sha256=_code_sha(source))
            meta = ScriptMeta.model_validate(merged)
            self._validate(principal, row.script_id, source, meta)
            self.store.put_draft(meta, source)
            self.catalog.update_draft(conn, meta)
            self._audit(principal, "update_draft", row.script_id, None, call_id, conn)
        return meta

    # ----------------------------------------------------------------- publish

    def publish(self, principal: Principal, script_id: str,
                call_id: str | None = None) -> tuple[ScriptMeta, bool]:
        """Freeze the draft into the next immutable version; (existing, True) if nothing changed."""
        tier_of(principal, self.cfg)
        row = self._owned(principal, script_id)
        with self.catalog.transaction() as conn:
            row = self.catalog.get_script(row.script_id, conn, for_update=True) or row
            draft = self.store.get_meta(row.owner_id, row.script_id, DRAFT)
            source = self.store.get_source(row.owner_id, row.script_id, DRAFT)
            self._validate(principal, row.script_id, source, draft)
            if row.latest_version:
                latest = self.store.get_meta(row.owner_id, row.script_id, row.latest_version)
                if latest.content_key() == draft.content_key():
                    return latest, True
            stored = self.store.stored_versions(row.owner_id, row.script_id)
            number = max([row.latest_version or 0, *stored]) + 1
            stamp = now()
            meta = draft.model_copy(update={"version": number, "status": "published", "created_at": stamp,
                                            "updated_at": stamp, "tier": principal.tier})
            meta = ScriptMeta.model_validate(meta.model_dump())
            self.store.put_version(meta, source)
            self.catalog.insert_version(conn, meta, hashlib.sha256(meta.to_json_bytes()).hexdigest())
            queued = buildqueue.enqueue(conn, row.script_id, number, self.cfg)  # its image (faas/buildqueue.py)
            self._audit(principal, "publish", row.script_id, number, call_id, conn)
        if queued and (worker := buildqueue.worker_for(self, self.cfg)) is not None:
            worker.kick()
        return meta, False

    # ----------------------------------------------------------------- reads

    def list_versions(self, principal: Principal, script_id: str) -> list[VersionRow]:
        """All versions for the owner; the versions the caller may use for anyone else."""
        tier_of(principal, self.cfg)
        row = self._script(principal, script_id)
        versions = self.catalog.versions(row.script_id)
        if is_owner(principal, row):
            return versions
        subscribed = bool(self._subscribed(principal, [row.script_id]))
        current = self._current({row.script_id}, row).get(row.script_id)
        usable, denial = [], None
        for v in versions:
            try:
                check_can_use_now(principal, v, current, subscribed=subscribed, cfg=self.cfg)
                usable.append(v)
            except Denied as exc:
                denial = exc
        if not usable:
            if denial is None or denial.hidden or row.tenant != principal.tenant:
                raise _not_found(script_id)
            raise denial
        return usable

    def get(self, principal: Principal, script_id: str) -> dict[str, Any]:
        """Owner: the draft with source. Others: the latest published version, without source."""
        tier_of(principal, self.cfg)
        row = self._script(principal, script_id)
        if is_owner(principal, row):
            meta = self.store.get_meta(row.owner_id, row.script_id, DRAFT)
            source = self.store.get_source(row.owner_id, row.script_id, DRAFT)
            return {**meta.model_dump(mode="json"), "source": source, "latest_version": row.latest_version}
        if not row.latest_version:
            if row.tenant != principal.tenant:
                raise _not_found(script_id)
            raise Denied(f"script {script_id} has no published version", code="not_published")
        version = self.catalog.get_version(row.script_id, row.latest_version)
        if version is None:
            raise _not_found(script_id)
        self._check(principal, version)
        meta = self.store.get_meta(row.owner_id, row.script_id, row.latest_version)
        return {**meta.model_dump(mode="json"), "latest_version": row.latest_version}

    def get_version(self, principal: Principal, script_id: str, version: object) -> dict[str, Any]:
        tier_of(principal, self.cfg)
        row = self._script(principal, script_id)
        number = parse_version(version)
        owner = is_owner(principal, row)
        if number == DRAFT:
            if not owner:
                if row.tenant != principal.tenant:
                    raise _not_found(script_id)
                raise Forbidden("only the owner may read the draft", code="not_owner")
        else:
            vrow = self.catalog.get_version(row.script_id, int(number))
            if vrow is None:
                if not owner and row.tenant != principal.tenant:
                    raise _not_found(script_id)
                raise NotFound(f"version {script_id}@{number} not found", code="version_not_found")
            self._check(principal, vrow)
        meta = self.store.get_meta(row.owner_id, row.script_id, number)
        out = {**meta.model_dump(mode="json"), "latest_version": row.latest_version}
        if owner:
            out["source"] = self.store.get_source(row.owner_id, row.script_id, number)
        if number != DRAFT and (build := self.builds.state(row.script_id, int(number))) is not None:
            out["build"] = build.as_json(with_log=owner)
        return out

    # ----------------------------------------------------------------- marketplace

    def subscribe(self, principal: Principal, script_id: str, call_id: str | None = None) -> bool:
        """Subscribe to a marketplace-listed script (any tenant); True when new."""
        tier_of(principal, self.cfg)
        row = self._script(principal, script_id)  # another tenant's unlisted script: 404
        latest = self.catalog.get_version(row.script_id, row.latest_version) if row.latest_version else None
        if latest is None or not latest.permissions.marketplace:
            raise Forbidden(f"script {script_id} is not listed on the marketplace", code="not_listed")
        try:
            check_can_use(principal, latest, latest.version, subscribed=True, cfg=self.cfg)
        except Denied as exc:
            raise Forbidden(exc.message, code=exc.code) from None
        created = self.catalog.subscribe(row.script_id, principal.user_id, principal.tenant)
        if created:
            self._audit(principal, "subscribe", row.script_id, None, call_id)
        return created

    # ----------------------------------------------------------------- execution support

    def resolve_closure(self, script_id: str, version: int) -> list[tuple[str, int]]:
        """The version and everything it depends on, dependencies first (the order to run them).

        Cached per version: a published version's dependencies are pinned (`id@version`) and its
        row never changes, so neither does its closure. Failures are not cached.
        """
        root = (ids.script_id(script_id), ids.version(version))
        cached = self._closures.get(root)
        if cached is not None:
            return list(cached)
        graph = validation.walk_versions(self.catalog, [root])
        if root not in graph:
            raise NotFound(f"version {script_id}@{version} not found", code="version_not_found")
        order: list[tuple[str, int]] = []
        done: set[tuple[str, int]] = set()
        stack: list[tuple[tuple[str, int], bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                order.append(node)
                continue
            row = graph.get(node)
            if row is None:
                raise Invalid(f"dependency {node[0]}@{node[1]} is missing", code="dependency_missing")
            stack.append((node, True))
            for dep in reversed(row.depends_on):
                pair = parse_dependency(dep)
                if pair not in done:
                    stack.append((pair, False))
        if len(self._closures) >= CLOSURE_CACHE_SIZE:
            self._closures.clear()
        self._closures[root] = tuple(order)
        return order

    def check_execution(self, principal: Principal, script_id: str, version: int,
                        row: ScriptRow | None = None) -> list[tuple[str, int]]:
        """Permission check for execute: the caller may use the version and its whole closure.

        Returns the closure in dependency order. 404 for unknown or invisible scripts, 403 when the
        root or any dependency is not usable — always before anything runs. `row`: the script's
        catalog row when the caller has just read it (saves a round trip; it is re-checked for
        visibility here). Marketplace subscriptions are read live, in one query, and only when the
        closure holds a script the caller does not own (owners need none).
        """
        tier_of(principal, self.cfg)
        row = self._visible(principal, row) if row is not None and row.script_id == script_id \
            else self._script(principal, script_id)
        number = ids.version(version)
        closure = self.resolve_closure(row.script_id, number)
        rows = self.catalog.get_versions(closure)
        members = [rows[p] for p in closure]
        foreign = sorted({m.script_id for m in members if not is_owner(principal, m)})
        subs = self._subscribed(principal, foreign) if foreign else set()
        # the current policy of every script in the closure (owners need none: they may use all)
        current = self._current(set(foreign), row) if foreign else {}
        target = rows[(row.script_id, number)]
        try:
            check_can_use_now(principal, target, current.get(target.script_id),
                              subscribed=target.script_id in subs, cfg=self.cfg)
        except Denied as exc:
            if exc.hidden:
                raise _not_found(target.script_id) from None
            raise
        check_dependency_closure(principal, members[:-1], subscribed=subs, current=current, cfg=self.cfg)
        return closure

    def load_version(self, script_id: str, version: Version) -> tuple[ScriptMeta, str]:
        """meta.json and script.py of a version (trusted callers: build, deploy, execute)."""
        row = self.catalog.get_script(ids.script_id(script_id))
        if row is None:
            raise _not_found(script_id)
        number = parse_version(version)
        return (self.store.get_meta(row.owner_id, row.script_id, number),
                self.store.get_source(row.owner_id, row.script_id, number))

    # ----------------------------------------------------------------- listing and deprecation

    def _listed_access(self, principal: Principal, row: ScriptRow, current: VersionRow | None,
                       subscribed: bool) -> str | None:
        """How the caller comes to see `row` in GET /scripts, or None: the same visibility and use
        checks as every read (`_visible`, then `check_can_use_now` on the current policy)."""
        if is_owner(principal, row):
            return "owner"
        if current is None:
            return None
        try:
            self._visible(principal, row)
            check_can_use_now(principal, current, current, subscribed=subscribed, cfg=self.cfg)
        except (NotFound, Denied):
            return None
        return "shared" if row.tenant == principal.tenant else "marketplace"

    def list_scripts(self, principal: Principal, *, limit: int = 50, cursor: str | None = None,
                     owner_id: str | None = None, runtime_mode: str | None = None, marketplace: bool | None = None,
                     status: str | None = None, text: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """The scripts the caller may see, in id order: their own (drafts included), those shared with
        them in their tenant, and marketplace scripts they are entitled to. Candidates come from the
        caller's tenant and marketplace subscriptions only; each then passes `_listed_access`.
        Returns (items, next cursor or None at the end)."""
        tier_of(principal, self.cfg)
        after = ids.script_id(cursor) if cursor is not None else ""
        items: list[dict[str, Any]] = []
        chunk = max(limit, 50)
        for _ in range(LISTING_MAX_CHUNKS):
            rows = self.catalog.listing_candidates(principal.tenant, principal.user_id, after=after, limit=chunk,
                                                   owner_id=owner_id, runtime_mode=runtime_mode,
                                                   marketplace=marketplace, text=text)
            foreign = [r.script_id for r in rows if not is_owner(principal, r)]
            subs = self._subscribed(principal, foreign)
            current = self._current(set(foreign))
            deprecated = self.catalog.deprecations([r.script_id for r in rows if r.latest_version])
            for row in rows:
                after = row.script_id
                access = self._listed_access(principal, row, current.get(row.script_id), row.script_id in subs)
                if access is None:
                    continue
                old = sorted(v for sid, v in deprecated if sid == row.script_id)
                state = ("draft" if not row.latest_version else
                         "deprecated" if row.latest_version in old else "published")
                if status is not None and state != status:
                    continue
                items.append({"script_id": row.script_id, "name": row.name, "owner_id": row.owner_id,
                              "tenant": row.tenant, "runtime_mode": row.runtime_mode,
                              "marketplace": row.marketplace, "latest_version": row.latest_version,
                              "status": state, "access": access, "deprecated_versions": old,
                              "updated_at": row.updated_at.isoformat()})
                if len(items) == limit:
                    return items, row.script_id
            if len(rows) < chunk:
                return items, None
        return items, after  # scanned enough for one page: the caller continues from here

    def deprecate(self, principal: Principal, script_id: str, version: object, *, deprecated: bool = True,
                  reason: str | None = None, call_id: str | None = None) -> dict[str, Any]:
        """Mark a published version deprecated (owner): no new subscriptions to it; running ones go on."""
        tier_of(principal, self.cfg)
        row = self._owned(principal, script_id)
        number = ids.version(version)
        if not self.catalog.set_deprecated(row.script_id, number, deprecated, reason):
            raise NotFound(f"version {row.script_id}@{number} not found", code="version_not_found")
        self._audit(principal, "deprecate" if deprecated else "undeprecate", row.script_id, number, call_id)
        when, why = self.catalog.deprecations([row.script_id]).get((row.script_id, number), (None, None))
        return {"script_id": row.script_id, "version": number, "deprecated": when is not None,
                "deprecated_at": when.isoformat() if when else None, "reason": why}

    def check_subscribable(self, script_id: str, version: int) -> None:
        """409 for a deprecated version: nothing new subscribes to it."""
        found = self.catalog.deprecations([script_id]).get((script_id, version))
        if found is not None:
            raise Conflict(f"version {script_id}@{version} is deprecated{': ' + found[1] if found[1] else ''}; "
                           "subscribe to a newer version", code="version_deprecated")


def _code_sha(source: str) -> str:
    """sha256 of the source; a placeholder for unencodable text, which check_source then rejects."""
    try:
        return sha256_text(source)
    except UnicodeEncodeError:
        return "0" * 64
