"""Signed, short-lived invocation tokens for script functions.

Why: OpenFaaS CE invocation endpoints are unauthenticated, so every script function verifies an
HMAC-SHA256 token minted by the platform (registry/scheduler) before doing anything.
Format: base64url(JSON claims) "." base64url(HMAC-SHA256(secret, "csinv1." + claims_b64)).
Claims always carry fn (the function name), iat, exp and a random jti.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from customscripts.config import settings
from customscripts.errors import Unauthenticated

PREFIX = b"csinv1."
CLOCK_SKEW_S = 5
MAX_TOKEN_LEN = 8192


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, body: str, prefix: bytes = PREFIX) -> str:
    return _b64e(hmac.new(secret.encode(), prefix + body.encode(), hashlib.sha256).digest())


def mint_invocation_token(function_name: str, claims: dict[str, Any] | None = None, ttl: int | None = None,
                          *, secret: str | None = None, now: float | None = None) -> str:
    now = time.time() if now is None else now
    ttl = settings().invocation_token_ttl_s if ttl is None else ttl
    body = dict(claims or {})
    body.update({"fn": function_name, "iat": int(now), "exp": int(now + ttl), "jti": secrets.token_hex(8)})
    payload = _b64e(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_sign(secret or settings().invocation_secret, payload)}"


def verify_invocation_token(token: str, function_name: str, *, secret: str | None = None,
                            now: float | None = None) -> dict[str, Any]:
    """Return the claims or raise Unauthenticated (bad format, bad signature, other function, expired)."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
        raise Unauthenticated("missing or malformed invocation token", code="invalid_invocation_token")
    payload, sig = token.split(".")
    expected = _sign(secret or settings().invocation_secret, payload)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        raise Unauthenticated("invalid invocation token signature", code="invalid_invocation_token")
    try:
        claims = json.loads(_b64d(payload))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unauthenticated("malformed invocation token", code="invalid_invocation_token") from exc
    if not isinstance(claims, dict):
        raise Unauthenticated("malformed invocation token", code="invalid_invocation_token")
    if claims.get("fn") != function_name:
        raise Unauthenticated("invocation token is for another function", code="invalid_invocation_token")
    now = time.time() if now is None else now
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise Unauthenticated("invocation token without exp/iat", code="invalid_invocation_token")
    if now > exp:
        raise Unauthenticated("invocation token expired", code="invocation_token_expired")
    if iat > now + CLOCK_SKEW_S:
        raise Unauthenticated("invocation token issued in the future", code="invalid_invocation_token")
    return claims


PREFETCH_PREFIX = b"csprefetch1."


def batch_digest(items: Any, default_token: Any) -> str:
    """sha256 of a batch's items and default execution token in canonical JSON (both sides Python)."""
    canonical = json.dumps({"items": items, "execution_token": default_token}, sort_keys=True,
                           separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _prefetch_mac(secret: str, function_name: str, tenant: str, exp: int, digest: str, data: str) -> str:
    body = "\n".join((function_name, tenant, str(exp), digest, hashlib.sha256(data.encode()).hexdigest()))
    return _b64e(hmac.new(secret.encode(), PREFETCH_PREFIX + body.encode(), hashlib.sha256).digest())


def sign_prefetch(function_name: str, tenant: str, items: Any, default_token: Any, data: str, *,
                  ttl: int | None = None, secret: str | None = None, now: float | None = None) -> dict[str, Any]:
    """The `prefetch` member of a batch body: data the scheduler read for these items, bound by a MAC
    (invocation secret, own prefix) to this function, tenant, exact items and expiry - so holding an
    invocation token is not enough to make a script read forged data."""
    now = time.time() if now is None else now
    exp = int(now + (settings().invocation_token_ttl_s if ttl is None else ttl))
    mac = _prefetch_mac(secret or settings().invocation_secret, function_name, tenant, exp,
                        batch_digest(items, default_token), data)
    return {"data": data, "exp": exp, "mac": mac}


def verify_prefetch(prefetch: Any, function_name: str, tenant: str, items: Any, default_token: Any, *,
                    secret: str | None = None, now: float | None = None) -> str:
    """The prefetch's data string, or Unauthenticated (bad shape, MAC, expiry, other items or tenant)."""
    if not isinstance(prefetch, dict) or not isinstance(prefetch.get("data"), str) or \
            not isinstance(prefetch.get("mac"), str) or not isinstance(prefetch.get("exp"), int):
        raise Unauthenticated("malformed prefetch", code="invalid_prefetch")
    now = time.time() if now is None else now
    if now > prefetch["exp"]:
        raise Unauthenticated("prefetch expired", code="invalid_prefetch")
    expected = _prefetch_mac(secret or settings().invocation_secret, function_name, tenant, prefetch["exp"],
                             batch_digest(items, default_token), prefetch["data"])
    if not hmac.compare_digest(expected.encode(), prefetch["mac"].encode()):
        raise Unauthenticated("invalid prefetch signature", code="invalid_prefetch")
    return prefetch["data"]


# A version's function URL (faas/function_url.py): the function asks the registry, through gateway-fn,
# to authorise a user's call and later to complete it. Each request carries a proof made with the
# invocation secret (only the registry, the scheduler and the functions' trusted supervisors hold it),
# under its own prefix, so neither an invocation token nor a user can stand in for a function.
FUNCTION_REQUEST_PREFIX = b"csfnreq1."
GRANT_PREFIX = b"csgrant1."


def _seal(prefix: bytes, claims: dict[str, Any], ttl: float, secret: str | None, now: float | None) -> str:
    now = time.time() if now is None else now
    body = {**claims, "exp": now + ttl}
    payload = _b64e(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_sign(secret or settings().invocation_secret, payload, prefix)}"


def _open(prefix: bytes, token: Any, what: str, code: str, secret: str | None, now: float | None) -> dict[str, Any]:
    if not isinstance(token, str) or len(token) > 4 * MAX_TOKEN_LEN or token.count(".") != 1:
        raise Unauthenticated(f"missing or malformed {what}", code=code)
    payload, sig = token.split(".")
    if not hmac.compare_digest(_sign(secret or settings().invocation_secret, payload, prefix).encode(), sig.encode()):
        raise Unauthenticated(f"invalid {what} signature", code=code)
    try:
        claims = json.loads(_b64d(payload))
    except (ValueError, UnicodeDecodeError):
        raise Unauthenticated(f"malformed {what}", code=code) from None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or (time.time() if now is None else now) > exp:
        raise Unauthenticated(f"{what} expired", code=code)
    return claims


def function_request_proof(function_name: str, purpose: str, call_id: str, body: bytes, *, ttl: float = 60,
                           secret: str | None = None, now: float | None = None) -> str:
    """What a function sends with its authorise/complete request: bound to it, the purpose, the call
    and the exact body."""
    return _seal(FUNCTION_REQUEST_PREFIX, {"fn": function_name, "purpose": purpose, "call": call_id,
                                           "body": hashlib.sha256(body).hexdigest()}, ttl, secret, now)


def verify_function_request(proof: Any, purpose: str, call_id: str, body: bytes, *, secret: str | None = None,
                            now: float | None = None) -> str:
    """The requesting function's name, or Unauthenticated (not a function's proof, another call or body)."""
    claims = _open(FUNCTION_REQUEST_PREFIX, proof, "function request proof", "invalid_function_request", secret, now)
    if claims.get("purpose") != purpose or claims.get("call") != call_id or \
            claims.get("body") != hashlib.sha256(body).hexdigest() or not isinstance(claims.get("fn"), str):
        raise Unauthenticated("function request proof is for another request", code="invalid_function_request")
    return claims["fn"]


def seal_grant(claims: dict[str, Any], ttl: float, *, secret: str | None = None, now: float | None = None) -> str:
    """An authorised execute, sealed by the registry for the function to hand back at completion."""
    return _seal(GRANT_PREFIX, claims, ttl, secret, now)


def open_grant(grant: Any, *, secret: str | None = None, now: float | None = None) -> dict[str, Any]:
    return _open(GRANT_PREFIX, grant, "execute grant", "invalid_grant", secret, now)
