"""What callers send, parsed one way for every route: JSON bodies into their models (the shared
fields of evaluation requests: registry/models.EvaluationTarget), query parameters
checked against what the route accepts. The errors are the caller's and name what is wrong: 400 for
a value that is not of the right kind, 422 for one out of range or a body that fails its model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from customscripts.errors import Invalid, Malformed

if TYPE_CHECKING:
    from pydantic import BaseModel

M = TypeVar("M", bound="BaseModel")

MAX_EPOCH = 4_102_444_800.0  # 2100-01-01: the latest time any route accepts


def parse_body(model: type[M], raw: Any, what: str) -> M:
    """A request body (already decoded JSON) as its model; 422 `invalid_body` listing every problem."""
    from pydantic import ValidationError  # here: gateway-fn, which takes no bodies, has no pydantic

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise Invalid.from_validation(exc, f"{what} body is invalid") from None


def check_query(query: Mapping[str, str], allowed: Iterable[str]) -> None:
    """400 `unknown_parameter` for any parameter the route does not take (a typo is never ignored)."""
    accepted = set(allowed)
    unknown = sorted(set(query) - accepted)
    if unknown:
        raise Malformed(f"unknown query parameter(s): {', '.join(unknown)[:200]}; "
                        f"allowed: {', '.join(sorted(accepted))}", code="unknown_parameter")


def required_param(query: Mapping[str, str], name: str) -> str:
    value = query.get(name)
    if value is None or value == "":
        raise Malformed(f"missing query parameter {name!r}", code="missing_parameter")
    return value


def time_param(query: Mapping[str, str], name: str, *, low: float = 0.0, high: float = MAX_EPOCH) -> float | None:
    """Epoch seconds, or an ISO 8601 timestamp (UTC when it has no offset); None when absent."""
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise Malformed(f"{name} must be epoch seconds or ISO 8601, got {raw[:40]!r}",
                            code="invalid_parameter") from None
        value = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(value) or not low <= value <= high:
        raise Invalid(f"{name} out of range: {raw[:40]!r}", code="invalid_parameter")
    return value


def int_param(query: Mapping[str, str], name: str, low: int, high: int, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Malformed(f"{name} must be an integer, got {raw[:40]!r}", code="invalid_parameter") from None
    if not low <= value <= high:
        raise Invalid(f"{name} must be between {low} and {high}, got {value}", code="invalid_parameter")
    return value
