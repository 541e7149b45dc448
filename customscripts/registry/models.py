"""meta.json as one pydantic model, plus the request bodies that edit it.

`ScriptMeta` is the single definition of a script version's metadata: it is what lands in
`scripts/{owner}/{script}/{version}/meta.json`, what the API returns and what OpenAPI documents.
Every id inside it is validated by `customscripts.ids`, so a model that validates is safe to turn
into object keys and SQL parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from customscripts import ids
from customscripts.errors import DomainError
from customscripts.text import unstorable

MAX_SOURCE_BYTES = 256 * 1024
MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPENDENCIES = 64
_MAX_LIST = 256
# Printable text only: no NUL / control characters / lone surrogates (they break Postgres and S3).
_TEXT = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]*\Z")


def _as_value_error(func, value: Any) -> Any:
    try:
        return func(value)
    except DomainError as exc:
        raise ValueError(exc.message) from None


def _script_id(value: str) -> str:
    return _as_value_error(ids.script_id, value)


def _user_id(value: str) -> str:
    return _as_value_error(ids.owner_id, value)


def _group_id(value: str) -> str:
    return _as_value_error(ids.tenant_id, value)


def _text(value: str) -> str:
    if not _TEXT.match(value):
        raise ValueError("text must not contain control characters or lone surrogates")
    return value


def _storable_json(value: Any) -> Any:
    if unstorable(value):
        raise ValueError("strings must not contain NUL characters or lone surrogates (no store can keep them)")
    return value


StorableParams = Annotated[dict[str, Any], AfterValidator(_storable_json)]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true or false")
    return value


# A number field of an evaluation body: pydantic's lax mode reads `true` as 1 (a series from 1970, a
# version 1); numeric strings stay accepted as they always were.
Number = BeforeValidator(_not_bool)


def parse_dependency(value: str) -> tuple[str, int]:
    """`script_id@version` → (script_id, version); raises ValueError on anything else."""
    if not isinstance(value, str) or value.count("@") != 1:
        raise ValueError("dependency must be 'script_id@version'")
    sid, _, ver = value.partition("@")
    return _script_id(sid), _as_value_error(ids.version, ver)


def _dependency(value: str) -> str:
    sid, ver = parse_dependency(value)
    return f"{sid}@{ver}"


ScriptId = Annotated[str, Field(min_length=1, max_length=63), AfterValidator(_script_id)]
UserId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_user_id)]
GroupId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_group_id)]
Dependency = Annotated[str, Field(min_length=3, max_length=80, pattern=r"^[a-z0-9][a-z0-9_-]*@[0-9]+$"),
                       AfterValidator(_dependency)]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_text)]
Description = Annotated[str, Field(max_length=4000), AfterValidator(_text)]
RuntimeMode = Literal["realtime", "onetime"]
Status = Literal["draft", "published", "deprecated"]


class Permissions(BaseModel):
    """Who besides the owner may use the script. Teams, orgs and users are same-tenant only;
    `marketplace: true` lists published versions for subscribers of any tenant."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tiers: list[GroupId] = Field(default_factory=list, max_length=_MAX_LIST)
    features: list[GroupId] = Field(default_factory=list, max_length=_MAX_LIST)
    allowed_users: list[UserId] = Field(default_factory=list, max_length=_MAX_LIST)
    teams: list[GroupId] = Field(default_factory=list, max_length=_MAX_LIST)
    orgs: list[GroupId] = Field(default_factory=list, max_length=_MAX_LIST)
    marketplace: bool = False


class Limits(BaseModel):
    """Per-script resource overrides; each must stay within the owner's tier caps."""

    model_config = ConfigDict(extra="forbid", strict=True)

    timeout_ms: int | None = Field(default=None, ge=1, le=3_600_000)
    memory_mb: int | None = Field(default=None, ge=1, le=65_536)
    cpu_seconds: int | None = Field(default=None, ge=1, le=3600)


JsonSchema = dict[str, Any]


class ScriptMeta(BaseModel):
    """meta.json of one version (or of the draft, version "draft")."""

    model_config = ConfigDict(extra="forbid")

    script_id: ScriptId
    version: Annotated[int, Field(ge=1, le=999_999_999)] | Literal["draft"]
    owner_id: UserId
    tenant: GroupId
    name: Name
    description: Description = ""
    runtime_mode: RuntimeMode = "onetime"
    permissions: Permissions = Field(default_factory=Permissions)
    input_schema: JsonSchema = Field(default_factory=dict)
    output_schema: JsonSchema = Field(default_factory=dict)
    depends_on: list[Dependency] = Field(default_factory=list, max_length=MAX_DEPENDENCIES)
    created_at: datetime
    updated_at: datetime
    status: Status
    code_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    limits: Limits | None = None
    # The owner's tier when the version was published: it sizes the version's function (limits,
    # allowed modules) whoever runs it, so a subscriber's tier never changes the sandbox.
    tier: GroupId | None = None

    def content_key(self) -> str:
        """A stable fingerprint of code + behaviour-defining metadata (for unchanged publishes)."""
        data = self.model_dump(mode="json", include=set(CONTENT_FIELDS))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def dependencies(self) -> list[tuple[str, int]]:
        return [parse_dependency(d) for d in self.depends_on]

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2).encode()


# Fields that define a version's behaviour: publishing a draft equal on these is a no-op.
CONTENT_FIELDS = ("name", "description", "runtime_mode", "permissions", "input_schema", "output_schema",
                  "depends_on", "limits", "code_sha256")


class DraftCreate(BaseModel):
    """POST /scripts body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    script_id: ScriptId | None = None
    description: Description = ""
    source: Annotated[str, Field(min_length=1)]
    runtime_mode: RuntimeMode = "onetime"
    permissions: Permissions = Field(default_factory=Permissions)
    input_schema: JsonSchema = Field(default_factory=dict)
    output_schema: JsonSchema = Field(default_factory=dict)
    depends_on: list[Dependency] = Field(default_factory=list, max_length=MAX_DEPENDENCIES)
    limits: Limits | None = None


class DraftUpdate(BaseModel):
    """PUT/PATCH /scripts/{id} body: every field optional; the ones given replace the draft's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name | None = None
    description: Description | None = None
    source: Annotated[str, Field(min_length=1)] | None = None
    runtime_mode: RuntimeMode | None = None
    permissions: Permissions | None = None
    input_schema: JsonSchema | None = None
    output_schema: JsonSchema | None = None
    depends_on: list[Dependency] | None = Field(default=None, max_length=MAX_DEPENDENCIES)
    limits: Limits | None = None


def sha256_text(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def now() -> datetime:
    return datetime.now(UTC)


# ----------------------------------------------------------------- API responses (OpenAPI)


class ScriptView(ScriptMeta):
    """GET /scripts/{id}: meta, plus `source` for the owner only."""

    source: str | None = None
    latest_version: int | None = None


FUNCTION_URL = Field(default=None, description=(
    "The version's function URL: POST the execute body there with your own bearer token (same answer, "
    "statuses and audit as POST /scripts/{id}/execute), or to /async-function/<name> with X-Callback-Url."))


class BuildView(BaseModel):
    """A version's image build (customscripts/faas/buildqueue.py); `log` for the owner only."""

    status: str
    image: str | None = None
    attempts: int = 0
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    log: str | None = None


class VersionView(ScriptView):
    """GET /scripts/{id}/versions/{n}: the version's meta, its function URL and, where images are built
    on publish, its build."""

    function_url: str | None = FUNCTION_URL
    build: BuildView | None = None


class PublishResult(ScriptMeta):
    """POST /scripts/{id}/publish: the version; `unchanged` when the draft equalled the latest."""

    unchanged: bool
    function_url: str | None = FUNCTION_URL


class VersionSummary(BaseModel):
    script_id: str
    version: int
    function_url: str | None = FUNCTION_URL
    status: Status
    code_sha256: str
    runtime_mode: RuntimeMode
    depends_on: list[str]
    created_at: datetime
    deprecated_at: datetime | None = Field(default=None, description="Set once deprecated: no new subscriptions.")
    deprecation_reason: str | None = None


class VersionList(BaseModel):
    script_id: str
    versions: list[VersionSummary]


class DeprecateBody(BaseModel):
    """POST /scripts/{id}/versions/{n}/deprecate body (optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reason: Annotated[str, Field(max_length=500), AfterValidator(_storable_json)] | None = None


class Deprecation(BaseModel):
    script_id: str
    version: int
    deprecated: bool
    deprecated_at: datetime | None = None
    reason: str | None = None


class ScriptListItem(BaseModel):
    """One script in GET /scripts: what the caller may see of it, and how they come to see it."""

    script_id: str
    name: str
    owner_id: str
    tenant: str
    runtime_mode: RuntimeMode
    marketplace: bool
    latest_version: int | None
    status: Literal["draft", "published", "deprecated"] = Field(
        description="draft: nothing published; deprecated: the latest version is deprecated.")
    access: Literal["owner", "shared", "marketplace"]
    deprecated_versions: list[int]
    updated_at: datetime
    function_url: str | None = Field(default=None, description="The latest version's function URL (see "
                                     "VersionSummary.function_url); null for a draft.")


class ScriptList(BaseModel):
    scripts: list[ScriptListItem]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end.")


class Subscription(BaseModel):
    script_id: str
    user_id: str
    tenant: str
    created: bool


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class EvaluationTarget(BaseModel):
    """What every evaluation request names (execute, series, subscribe): the series, the params, and
    optionally the version (default: the latest published). A number may come as a numeric string, never
    as `true` or `false` (`Number`)."""

    model_config = ConfigDict(extra="forbid")

    instrument_key: str = Field(max_length=64)
    timeframe: str = Field(max_length=8)
    params: StorableParams = Field(default_factory=dict)
    version: Annotated[int | None, Number] = Field(default=None, ge=1, le=999_999_999)
