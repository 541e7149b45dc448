"""API errors: each carries its HTTP status and a stable machine-readable code."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class Unprocessable(ApiError):
    status = 422
    code = "unprocessable"

    @classmethod
    def from_validation(cls, exc: Any, message: str) -> Unprocessable:
        """A pydantic ValidationError as a 422 listing where and why (bounded, without the input)."""
        details = [{"loc": [str(p) for p in e["loc"]], "msg": str(e["msg"])[:300], "type": e["type"]}
                   for e in exc.errors(include_url=False, include_input=False, include_context=False)[:20]]
        return cls(message, code="invalid_body", details=details)


class TooManyRequests(ApiError):
    status = 429
    code = "rate_limited"


class BadGateway(ApiError):
    status = 502
    code = "bad_gateway"


class ServiceUnavailable(ApiError):
    status = 503
    code = "unavailable"
