"""Identifier validation: an id is checked here before it touches an S3 key, SQL or a function name."""

from __future__ import annotations

import re
import secrets

from customscripts.errors import Invalid

# ASCII only: no '/', '..', NUL, control characters or unicode look-alikes can pass.
_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}\Z")
_INSTRUMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:|/-]{0,63}\Z")
_TIMEFRAME = re.compile(r"[0-9]{1,4}(s|m|h|d|w|mo)\Z")
_CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


def _check(pattern: re.Pattern[str], value: object, kind: str) -> str:
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        shown = repr(value)[:80]
        raise Invalid(f"invalid {kind}: {shown}", code=f"invalid_{kind}")
    return value


def script_id(value: object) -> str:
    """Script ids: lowercase DNS-friendly slugs, so they fit keys, SQL and function names."""
    return _check(_ID, value, "script_id")


def owner_id(value: object) -> str:
    return _check(_USER_ID, value, "owner_id")


def tenant_id(value: object) -> str:
    return _check(_USER_ID, value, "tenant")


def instrument_key(value: object) -> str:
    return _check(_INSTRUMENT, value, "instrument_key")


def timeframe(value: object) -> str:
    return _check(_TIMEFRAME, value, "timeframe")


def call_id(value: object) -> str:
    """Call ids (X-Call-Id): what a stored one-time result is keyed by."""
    return _check(_CALL_ID, value, "call_id")


def version(value: object) -> int:
    """Published versions are positive integers; strings of digits are accepted from URLs."""
    if isinstance(value, bool):
        raise Invalid(f"invalid version: {value!r}", code="invalid_version")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= 999_999_999:
        raise Invalid(f"invalid version: {str(value)[:40]!r}", code="invalid_version")
    return value


def new_script_id() -> str:
    return "s-" + secrets.token_hex(6)
