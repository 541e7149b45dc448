"""ExecutionResult and the supervisor-side output normalisation/validation.

Why on the supervisor side: the child is untrusted, so its output is re-checked here - shape, JSON
types, NaN/Infinity, size and the function's output_schema - before anything can be published.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from customscripts.text import unstorable

STATUSES = ("ok", "error", "timeout", "invalid_output", "dependency_failed", "denied")


@dataclass
class ExecutionResult:
    status: str
    output: dict | None = None
    error: dict | None = None
    duration_ms: float = 0.0
    cpu_ms: float = 0.0
    memory_mb: float = 0.0
    stdout: str = ""
    stderr: str = ""
    # set only by the supervisor, from the type of a failure it saw itself (DataSourceUnavailable, or a
    # dependency's bars not yet published: DependencyNotPublished):
    # nothing a script raises or prints can make a result retryable
    retryable: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        """The wire form (no copy: dataclasses.asdict deep-copied every output, per item of a batch)."""
        d = {"status": self.status, "output": self.output, "error": self.error, "duration_ms": self.duration_ms,
             "cpu_ms": self.cpu_ms, "memory_mb": self.memory_mb, "stdout": self.stdout, "stderr": self.stderr,
             "retryable": self.retryable}
        if self.meta:
            d["meta"] = self.meta
        return d


class InvalidOutput(ValueError):
    pass


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_finite(v: Any, path: str = "value") -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise InvalidOutput(f"{path} is {v!r}: NaN and Infinity are not allowed")
    if isinstance(v, dict):
        for k, x in v.items():
            _check_finite(x, f"{path}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_finite(x, f"{path}[{i}]")


def normalise_output(raw: Any, timestamp: float) -> dict:
    """number | dict of numbers | {"value": ..., "metadata": {...}} -> {"value","timestamp","metadata"}."""
    if raw is None:
        raise InvalidOutput("run(ctx) returned None; return a number, a dict of numbers or {'value': ...}")
    if _is_number(raw):
        value, metadata = raw, {}
    elif isinstance(raw, dict):
        if "value" in raw:
            extra = set(raw) - {"value", "metadata"}
            if extra:
                raise InvalidOutput(f"unexpected keys next to 'value': {sorted(extra)}")
            value, metadata = raw["value"], raw.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise InvalidOutput("metadata must be an object")
        else:
            value, metadata = raw, {}
    else:
        raise InvalidOutput(f"run(ctx) returned {type(raw).__name__}; expected a number or a dict")
    if isinstance(value, dict):
        if not value:
            raise InvalidOutput("value is an empty dict")
        for k, v in value.items():
            if not _is_number(v) and v is not None:
                raise InvalidOutput(f"value[{k!r}] is {type(v).__name__}; values must be numbers")
    elif not _is_number(value):
        raise InvalidOutput(f"value is {type(value).__name__}; expected a number or a dict of numbers")
    _check_finite(value)
    _check_finite(metadata, "metadata")
    return {"value": value, "timestamp": timestamp, "metadata": metadata}


class OutputValidator:
    """Compiled once per function: the jsonschema validator plus the size cap."""

    def __init__(self, schema: dict | None, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.schema = schema
        self._validator = None
        self._whole = False
        if schema:
            from jsonschema import Draft202012Validator
            from jsonschema.validators import validator_for

            cls = validator_for(schema, default=Draft202012Validator)
            cls.check_schema(schema)
            self._validator = cls(schema)
            props = schema.get("properties") if isinstance(schema, dict) else None
            # a schema describing the indicator envelope validates the whole output, else the value
            self._whole = isinstance(props, dict) and "value" in props and schema.get("type") == "object"

    def validate(self, raw: Any, timestamp: float) -> dict:
        out = normalise_output(raw, timestamp)
        text = json.dumps(out, allow_nan=False, separators=(",", ":"))
        if len(text) > self.max_bytes:
            raise InvalidOutput(f"output is {len(text)} bytes; the limit is {self.max_bytes}")
        if ("\\u0000" in text or "\\ud" in text) and unstorable(out):  # ASCII-escaped: only as an escape
            raise InvalidOutput("output holds a NUL character or a lone UTF-16 surrogate, which no store can keep")
        if self._validator is not None:
            target = out if self._whole else out["value"]
            errors = sorted(self._validator.iter_errors(target), key=lambda e: list(e.path))
            if errors:
                e = errors[0]
                where = "/".join(str(p) for p in e.path) or "(root)"
                raise InvalidOutput(f"output_schema violation at {where}: {e.message[:500]}")
        return out
