"""One retry policy, shared by everything that tries a transient failure again (the data gateway
client, the realtime scheduler's evaluations, the audit writer), in the manner of redis-py's `Retry`.

Why a type: whether to try again is decided from what failed (an exception's type, a status the
caller classified), never by matching words in a message; how long to wait is decided here, once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`attempts` in all (the first included), pausing `backoff_s` after the first failure, doubled
    after each further one and capped at `max_backoff_s`. With `jitter` half of each pause is random,
    so callers that failed together do not come back together."""

    attempts: int = 4
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("a retry policy needs attempts >= 1 and non-negative pauses")

    def gives_up(self, failures: int) -> bool:
        """True once `failures` failed attempts have used up the policy."""
        return failures >= self.attempts

    def pause(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1 for the first)."""
        step = min(self.max_backoff_s, self.backoff_s * 2 ** max(failures - 1, 0))
        return step / 2 + random.uniform(0, step / 2) if self.jitter else step
