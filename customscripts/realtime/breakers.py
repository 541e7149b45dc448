"""Circuit breakers per function and tenant: a hostile or broken function is bounded.

A function new to this replica, or one whose last invocation timed out or failed, gets one
single-item invocation at a time (a probe) until one is clean (answered, no timeout). Timeouts and
failed invocations are strikes; a clean invocation forgives one, so mixing ok items into timeouts does
not escape it. `scheduler_breaker_strikes` strikes — or one invocation past its deadline — open the
breaker: for the cool-down (doubled on each opening, until the function stays clean for the longest
cool-down) its items of that tenant are dead-lettered at once (`circuit_open`) without invoking it,
then one probe decides. Healthy functions get chunks sized to take about half the invocation deadline
at the per-item time they last took. So a function that holds its timeout on every event costs a
batch at most `strikes` item timeouts, then nothing until its cool-down ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from customscripts import logs
from customscripts.config import Settings
from customscripts.realtime import metrics

log = logs.get("customscripts.scheduler")


@dataclass
class _Breaker:
    strikes: int = 0  # timeouts and failed invocations, less one per clean invocation since
    proven: bool = False  # its last invocation was clean: full chunks, no probe
    open_until: float = 0.0
    opened_at: float = float("-inf")
    opens: int = 0  # openings not yet forgiven: the cool-down doubles with each
    per_item_s: float | None = None  # what an item took in its last clean invocation


class Breakers:
    """Circuit breakers per function and tenant (`(script_id, version, tenant)`), in this replica's
    memory (a new replica probes every function once)."""

    def __init__(self, cfg: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._state: dict[tuple[str, int, str], _Breaker] = {}
        self._lock = threading.Lock()

    def _get(self, key: tuple[str, int, str]) -> _Breaker:
        with self._lock:
            b = self._state.get(key)
            if b is None:
                b = self._state[key] = _Breaker()
            return b

    def is_open(self, key: tuple[str, int, str]) -> bool:
        return self.clock() < self._get(key).open_until

    def proven(self, key: tuple[str, int, str]) -> bool:
        return self._get(key).proven

    def chunk_cap(self, key: tuple[str, int, str], deadline_s: float) -> int:
        """Items per invocation so that one takes about half its deadline at the last per-item time."""
        per_item = self._get(key).per_item_s
        if not per_item:
            return self.cfg.scheduler_max_items
        return max(1, min(self.cfg.scheduler_max_items, int(deadline_s / 2 / per_item)))

    def success(self, key: tuple[str, int, str], per_item_s: float) -> None:
        """A clean invocation (answered, no item timed out): one strike forgiven, so a function that
        mixes timeouts into its answers still adds up to an opening; its openings are forgiven once
        it stayed clean for the longest cool-down."""
        b = self._get(key)
        b.strikes = max(0, b.strikes - 1)
        if self.clock() - b.opened_at >= self.cfg.scheduler_breaker_cooldown_max_s:
            b.opens = 0
        b.proven = True
        b.per_item_s = per_item_s

    def strike(self, key: tuple[str, int, str], *, hard: bool = False) -> None:
        """A timeout or a failed invocation; `hard` (past the deadline) opens the breaker at once."""
        b = self._get(key)
        b.strikes += 1
        b.proven = False
        if hard or b.strikes >= self.cfg.scheduler_breaker_strikes:
            cool = min(self.cfg.scheduler_breaker_cooldown_max_s, self.cfg.scheduler_breaker_cooldown_s * 2 ** b.opens)
            b.opened_at = self.clock()
            b.open_until = b.opened_at + cool
            b.opens += 1
            metrics.BREAKER_OPENED.inc()
            logs.event(log, "realtime circuit breaker opened", script_id=key[0], version=key[1], tenant=key[2],
                       strikes=b.strikes, cooldown_s=cool)
