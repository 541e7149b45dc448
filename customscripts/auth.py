"""Bearer-JWT principals: who is calling, in which tenant, with which tier, teams and orgs.

Tokens are issued by the product (HS256 with a shared secret locally, its keys in production);
this module only verifies them. Every claim that later reaches a key, SQL or a permission check
is validated here, so a hostile token is a 401 and never a bad id further down.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt

from customscripts import ids
from customscripts.config import Settings, settings
from customscripts.errors import DomainError, Unauthenticated
from customscripts.http import Request

_REQUIRED_CLAIMS = ("sub", "tenant", "tier", "exp")
_MAX_TOKEN_BYTES = 8192
_MAX_GROUPS = 256


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `teams` and `orgs` are ids inside `tenant` only."""

    user_id: str
    tenant: str
    tier: str
    features: frozenset[str] = field(default_factory=frozenset)
    teams: frozenset[str] = field(default_factory=frozenset)
    orgs: frozenset[str] = field(default_factory=frozenset)


def _unauthorized(message: str) -> Unauthenticated:
    return Unauthenticated(message, code="unauthorized")


def _str_set(claims: dict[str, Any], name: str) -> frozenset[str]:
    raw = claims.get(name, [])
    if not isinstance(raw, list) or len(raw) > _MAX_GROUPS:
        raise _unauthorized(f"token claim {name!r} must be a list of ids")
    out = set()
    for item in raw:
        try:
            out.add(ids.tenant_id(item))  # same shape as tenant ids: ASCII, no '/', no '..'
        except DomainError:
            raise _unauthorized(f"token claim {name!r} holds an invalid id") from None
    return frozenset(out)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """Claims → Principal; malformed claims are an authentication failure (401), not a 422."""
    try:
        user_id = ids.owner_id(claims.get("sub"))
        tenant = ids.tenant_id(claims.get("tenant"))
        tier = ids.tenant_id(claims.get("tier"))
    except DomainError:
        raise _unauthorized("token has invalid sub, tenant or tier claims") from None
    return Principal(
        user_id=user_id,
        tenant=tenant,
        tier=tier,
        features=_str_set(claims, "features"),
        teams=_str_set(claims, "teams"),
        orgs=_str_set(claims, "orgs"),
    )


def decode_token(token: str, cfg: Settings | None = None) -> Principal:
    cfg = cfg or settings()
    if len(token) > _MAX_TOKEN_BYTES:
        raise _unauthorized("bearer token too large")
    try:
        claims = jwt.decode(
            token,
            cfg.jwt_secret,
            algorithms=[cfg.jwt_algorithm],
            options={"require": list(_REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError:
        raise _unauthorized("bearer token expired") from None
    except jwt.InvalidTokenError as exc:
        raise _unauthorized(f"invalid bearer token: {type(exc).__name__}") from None
    if not isinstance(claims, dict):
        raise _unauthorized("invalid bearer token")
    return principal_from_claims(claims)


def principal_from_request(req: Request, cfg: Settings | None = None) -> Principal:
    """The caller of an HTTP request: `Authorization: Bearer <jwt>`, else 401."""
    header = req.header("Authorization")
    if not header:
        raise _unauthorized("missing bearer token")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("authorization header must be 'Bearer <token>'")
    return decode_token(token, cfg)


def issue_user_token(
    user_id: str,
    tenant: str,
    tier: str = "pro",
    *,
    features: Iterable[str] = (),
    teams: Iterable[str] = (),
    orgs: Iterable[str] = (),
    ttl_s: int = 3600,
    cfg: Settings | None = None,
) -> str:
    """A user token as the product would issue it (tests, demo, CLI)."""
    cfg = cfg or settings()
    now = int(time.time())
    claims = {
        "sub": user_id,
        "tenant": tenant,
        "tier": tier,
        "features": sorted(features),
        "teams": sorted(teams),
        "orgs": sorted(orgs),
        "iat": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(claims, cfg.jwt_secret, algorithm=cfg.jwt_algorithm)
