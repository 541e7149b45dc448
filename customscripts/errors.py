"""Domain errors: what went wrong, as a type with a stable machine-readable code and a message for
the caller.

No HTTP here: the API edge maps each type to its status in one table (`http.HTTP_STATUS`), so the
scheduler, the CLI and the tests handle the same errors without knowing HTTP. Whether trying again
later may succeed is a type too: `Transient` (an outage, a throttle, a function that could not be
reached), never a word in a message; `retry_after_s` is the hint for when (HTTP: Retry-After).
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class Transient(DomainError):
    """May succeed if tried again later (see customscripts/retry.py for how patiently)."""


class Malformed(DomainError):
    """The request is not what the operation reads (not JSON, unknown parameters, wrong kinds)."""

    code = "bad_request"


class Unauthenticated(DomainError):
    code = "unauthorized"


class Forbidden(DomainError):
    code = "forbidden"


class NotFound(DomainError):
    code = "not_found"


class MethodNotAllowed(DomainError):
    code = "method_not_allowed"


class Conflict(DomainError):
    code = "conflict"


class TooLarge(DomainError):
    code = "payload_too_large"


class Invalid(DomainError):
    """Well-formed, but the values break a rule (a schema, a range, a limit)."""

    code = "unprocessable"

    @classmethod
    def from_validation(cls, exc: Any, message: str) -> Invalid:
        """A pydantic ValidationError as an Invalid listing where and why (bounded, without the input)."""
        details = [{"loc": [str(p) for p in e["loc"]], "msg": str(e["msg"])[:300], "type": e["type"]}
                   for e in exc.errors(include_url=False, include_input=False, include_context=False)[:20]]
        return cls(message, code="invalid_body", details=details)


class Throttled(Transient):
    """Over a rate or concurrency limit: later, it will be let through."""

    code = "rate_limited"


class UpstreamFailed(Transient):
    """A component this operation depends on (a script function, the registry) failed or answered badly."""

    code = "bad_gateway"


class Unavailable(Transient):
    """A backing service (PostgreSQL, Redis, S3, the image builder) cannot be reached just now."""

    code = "unavailable"
