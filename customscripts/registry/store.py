"""Script code and meta.json in MinIO/S3: the source of truth for every version.

Layout, exactly: `scripts/{owner_id}/{script_id}/{version}/script.py` and `.../meta.json`, the
draft under the version segment `draft`. Every segment is validated by `customscripts.ids` before
a key is built. Published objects are write-once: the store checks before writing and refuses
with 409 (the catalog's row lock serialises publishers of one script).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from minio import Minio
from minio.error import S3Error

from customscripts import ids
from customscripts.config import Settings, settings
from customscripts.errors import Conflict, NotFound
from customscripts.registry.models import ScriptMeta

PREFIX = "scripts"
DRAFT = "draft"
SCRIPT_FILE = "script.py"
META_FILE = "meta.json"
_MISSING = ("NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound")


def client(cfg: Settings | None = None) -> Minio:
    cfg = cfg or settings()
    return Minio(cfg.s3_endpoint, access_key=cfg.s3_access_key, secret_key=cfg.s3_secret_key,
                 secure=cfg.s3_secure)


def _segment(version: int | str) -> str:
    return DRAFT if version == DRAFT else str(ids.version(version))


def prefix(owner_id: str, script_id: str) -> str:
    return f"{PREFIX}/{ids.owner_id(owner_id)}/{ids.script_id(script_id)}/"


def key(owner_id: str, script_id: str, version: int | str, filename: str) -> str:
    if filename not in (SCRIPT_FILE, META_FILE):
        raise ValueError(f"unknown script object {filename!r}")
    return f"{prefix(owner_id, script_id)}{_segment(version)}/{filename}"


@dataclass(frozen=True)
class StoredObject:
    key: str
    etag: str
    size: int


class ScriptStore:
    """Read and write script versions; thin over the minio client, like the client itself."""

    def __init__(self, cfg: Settings | None = None, minio: Minio | None = None) -> None:
        self.cfg = cfg or settings()
        self.bucket = self.cfg.s3_bucket
        self.s3 = minio or client(self.cfg)

    def ensure_bucket(self) -> None:
        if not self.s3.bucket_exists(self.bucket):
            self.s3.make_bucket(self.bucket)

    # ----------------------------------------------------------------- writes

    def _put(self, object_key: str, data: bytes, content_type: str) -> None:
        self.s3.put_object(self.bucket, object_key, io.BytesIO(data), len(data), content_type=content_type)

    def put_draft(self, meta: ScriptMeta, source: str) -> None:
        """Drafts are mutable: overwrite both objects."""
        if meta.version != DRAFT or meta.status != "draft":
            raise ValueError("put_draft takes draft metadata")
        self._put(key(meta.owner_id, meta.script_id, DRAFT, SCRIPT_FILE), source.encode(), "text/x-python")
        meta_key = key(meta.owner_id, meta.script_id, DRAFT, META_FILE)
        self._put(meta_key, meta.to_json_bytes(), "application/json")

    def put_version(self, meta: ScriptMeta, source: str) -> None:
        """Write a published version once; 409 if any of its objects already exists."""
        if meta.version == DRAFT:
            raise ValueError("put_version takes a numbered version")
        keys = [key(meta.owner_id, meta.script_id, meta.version, f) for f in (SCRIPT_FILE, META_FILE)]
        for object_key in keys:
            if self.stat(object_key) is not None:
                raise Conflict(f"version {meta.script_id}@{meta.version} is already published and immutable",
                               code="version_exists")
        # Code first, meta.json last: a version is visible (meta present) only once complete.
        self._put(keys[0], source.encode(), "text/x-python")
        self._put(keys[1], meta.to_json_bytes(), "application/json")

    # ----------------------------------------------------------------- reads

    def stat(self, object_key: str) -> StoredObject | None:
        try:
            st = self.s3.stat_object(self.bucket, object_key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise
        return StoredObject(object_key, (st.etag or "").strip('"'), int(st.size or 0))

    def read_bytes(self, object_key: str) -> bytes:
        try:
            resp = self.s3.get_object(self.bucket, object_key)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise NotFound(f"object {object_key} not found", code="script_object_missing") from None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def get_meta(self, owner_id: str, script_id: str, version: int | str) -> ScriptMeta:
        raw = self.read_bytes(key(owner_id, script_id, version, META_FILE))
        return ScriptMeta.model_validate(json.loads(raw))

    def get_source(self, owner_id: str, script_id: str, version: int | str) -> str:
        return self.read_bytes(key(owner_id, script_id, version, SCRIPT_FILE)).decode()

    def stored_versions(self, owner_id: str, script_id: str) -> list[int]:
        """Numbered versions with any object on the store (also orphans of a crashed publish)."""
        found = set()
        for obj in self.s3.list_objects(self.bucket, prefix=prefix(owner_id, script_id), recursive=True):
            segment = obj.object_name.rsplit("/", 2)[-2]
            if segment.isdigit():
                found.add(int(segment))
        return sorted(found)

    def keys(self, under: str = PREFIX + "/") -> list[str]:
        return sorted(o.object_name for o in self.s3.list_objects(self.bucket, prefix=under, recursive=True))
