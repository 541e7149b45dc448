"""Execution tokens: what one script execution may read from the data gateway, and as of when.

The invoker (registry-fn for one-time runs, the scheduler for realtime) mints a token per execution;
the supervisor presents it to the gateway and never hands it to the sandboxed child. It is a short
lived HS256 JWT signed with `execution_token_secret`, bound to an audience so a user API token (same
algorithm, other secret) or an invocation token can never be replayed here.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from customscripts import ids
from customscripts.config import Settings, settings
from customscripts.errors import Unauthenticated

AUDIENCE = "customscripts-gateway"
ISSUER = "customscripts"
TOKEN_TYPE = "execution"


def _key(cfg: Settings) -> bytes:
    """A 32-byte HMAC key derived from the configured secret (any length), separated by purpose."""
    return hashlib.sha256(b"customscripts/execution-token/" + cfg.execution_token_secret.encode()).digest()


@dataclass(frozen=True)
class ExecutionClaims:
    """A verified execution token; `deps` lists `script_id@version` (or bare ids: any version) it may read."""

    user: str
    tenant: str
    script_id: str
    version: int
    deps: tuple[str, ...]
    as_of: float
    tier: str
    exp: float
    call_id: str | None = None
    realtime: bool = False  # minted by the scheduler: metered against the tier's realtime budget

    def readable_versions(self, script_id: str) -> list[int] | None:
        """Versions of `script_id` this execution may read; raises LookupError when it may read none.

        The script itself is readable at its own version (stateful indicators read their own past).
        """
        versions: set[int] = set()
        any_version = False
        for entry in (*self.deps, f"{self.script_id}@{self.version}"):
            sid, _, ver = entry.partition("@")
            if sid != script_id:
                continue
            if ver:
                versions.add(int(ver))
            else:
                any_version = True
        if any_version:
            return None
        if not versions:
            raise LookupError(script_id)
        return sorted(versions)


def _dep(entry: str) -> str:
    """Validate `script_id` or `script_id@version`."""
    if not isinstance(entry, str):
        raise ValueError(f"invalid dependency entry: {entry!r}")
    sid, sep, ver = entry.partition("@")
    ids.script_id(sid)
    if sep:
        return f"{sid}@{ids.version(ver)}"
    return sid


def _finite(value: object) -> float:
    """An as-of time every comparison can trust: NaN or an infinity would open every bar."""
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError("as-of time must be a finite number")
    return number


def mint_execution_token(*, user: str, tenant: str, script_id: str, version: int, deps: Iterable[str],
                         as_of: float, tier: str, ttl_s: int | None = None, call_id: str | None = None,
                         cfg: Settings | None = None, now: float | None = None, realtime: bool = False) -> str:
    """Sign the scope of one execution; `deps` is the transitive dependency closure it may read."""
    cfg = cfg or settings()
    issued = time.time() if now is None else now
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "typ": TOKEN_TYPE,
        "sub": ids.owner_id(user),
        "tenant": ids.tenant_id(tenant),
        "sid": ids.script_id(script_id),
        "ver": ids.version(version),
        "deps": sorted({_dep(d) for d in deps}),
        "asof": _finite(as_of),
        "tier": str(tier),
        "iat": int(issued),
        "exp": int(issued + (cfg.execution_token_ttl_s if ttl_s is None else ttl_s)),
    }
    if call_id:
        claims["cid"] = call_id
    if realtime:
        claims["rt"] = True
    return jwt.encode(claims, _key(cfg), algorithm="HS256")


def verify_execution_token(token: str | None, cfg: Settings | None = None) -> ExecutionClaims:
    """Check signature, expiry, audience and shape; any failure is 401 with the reason."""
    cfg = cfg or settings()
    if not token:
        raise Unauthenticated("missing execution token (Authorization: Bearer ...)", code="missing_token")
    try:
        claims = jwt.decode(token, _key(cfg), algorithms=["HS256"], audience=AUDIENCE,
                            issuer=ISSUER, options={"require": ["exp", "iat", "sub", "aud", "iss"]})
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("execution token expired", code="token_expired") from None
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"invalid execution token: {exc}", code="invalid_token") from None
    try:
        if claims.get("typ") != TOKEN_TYPE:
            raise ValueError("not an execution token")
        return ExecutionClaims(
            user=ids.owner_id(claims["sub"]),
            tenant=ids.tenant_id(claims["tenant"]),
            script_id=ids.script_id(claims["sid"]),
            version=ids.version(claims["ver"]),
            deps=tuple(_dep(d) for d in claims.get("deps", [])),
            as_of=_finite(claims["asof"]),
            tier=str(claims["tier"]),
            exp=float(claims["exp"]),
            call_id=claims.get("cid"),
            realtime=claims.get("rt") is True,
        )
    except Exception as exc:  # malformed claims under a valid signature: still not usable
        raise Unauthenticated(f"invalid execution token claims: {exc}", code="invalid_token") from None
