"""SandboxLimits: per-function resource caps, usually from the owner's tier."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from customscripts.config import Tier, settings


@dataclass(frozen=True)
class SandboxLimits:
    timeout_ms: int = 1000
    memory_mb: int = 256
    cpu_seconds: float = 1
    allowed_modules: frozenset[str] = field(default_factory=frozenset)
    max_output_bytes: int = 64 * 1024
    max_log_bytes: int = 16 * 1024
    tmp_size_mb: int = 16
    tmp_inodes: int = 1024  # files + directories in an execution's private /tmp
    py_guards: bool = True  # tests only: False switches off the Python-level allowlist layer

    @classmethod
    def from_tier(cls, tier: Tier, **overrides: object) -> SandboxLimits:
        s = settings()
        base = cls(timeout_ms=tier.timeout_ms, memory_mb=tier.memory_mb, cpu_seconds=tier.cpu_seconds,
                   allowed_modules=frozenset(tier.allowed_modules), max_output_bytes=s.max_output_bytes,
                   max_log_bytes=s.max_log_bytes, tmp_size_mb=s.tmp_size_mb,
                   tmp_inodes=s.tmp_inodes)
        return replace(base, **overrides) if overrides else base  # type: ignore[arg-type]

    @classmethod
    def default(cls, **overrides: object) -> SandboxLimits:
        s = settings()
        tier = s.tier("pro") or next(iter(s.tiers.values()))
        return cls.from_tier(tier, **overrides)

    def to_wire(self) -> dict:
        return {"timeout_ms": self.timeout_ms, "memory_mb": self.memory_mb, "cpu_seconds": self.cpu_seconds,
                "allowed_modules": sorted(self.allowed_modules), "max_output_bytes": self.max_output_bytes,
                "max_log_bytes": self.max_log_bytes, "tmp_size_mb": self.tmp_size_mb,
                "tmp_inodes": self.tmp_inodes}
