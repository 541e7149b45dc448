"""What the scheduler needs to know about a published version, cached per process: a published
version is immutable (its source, pinned dependencies and limits never change), so each fact is read
once from the invoker's version cache. The only learnt fact is how many candles its reads need, as
its functions report it (DEFAULT_BARS until they have)."""

from __future__ import annotations

from customscripts.config import Settings
from customscripts.execution import Invoker
from customscripts.realtime.prefetch import DEFAULT_BARS, MAX_BARS

DEADLINE_MARGIN_S = 5.0  # on top of its items' timeouts, for an invocation's cold start


class VersionFacts:
    def __init__(self, invoker: Invoker, cfg: Settings) -> None:
        self.invoker = invoker
        self.cfg = cfg
        self._direct: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self._market_readers: dict[tuple[str, int], bool] = {}
        self._item_timeouts: dict[tuple[str, int], float] = {}
        self._bars: dict[tuple[str, int], int] = {}

    def dependencies(self, script_id: str, version: int) -> list[tuple[str, int]]:
        """A published version's direct dependencies."""
        key = (script_id, version)
        deps = self._direct.get(key)
        if deps is None:
            deps = self._direct[key] = list(self.invoker.version(script_id, version)[0].dependencies())
        return deps

    def reads_market(self, script_id: str, version: int) -> bool:
        """Whether a version's source mentions get_market_data: only then are candle windows sent
        along. A script that reaches the API another way simply reads through the gateway."""
        key = (script_id, version)
        found = self._market_readers.get(key)
        if found is None:
            found = self._market_readers[key] = "get_market_data" in self.invoker.version(script_id, version)[1]
        return found

    def bars(self, script_id: str, version: int) -> int:
        """Candles a version's reads need (what its functions reported, else DEFAULT_BARS)."""
        return min(self._bars.get((script_id, version), DEFAULT_BARS), MAX_BARS)

    def learn_bars(self, script_id: str, version: int, needed: int) -> None:
        learnt = self._bars.get((script_id, version))  # the default until a function reports
        self._bars[(script_id, version)] = min(MAX_BARS, needed if learnt is None else max(learnt, needed))

    def deadline_s(self, script_id: str, version: int, items: int | None = None) -> float:
        """How long an invocation of `items` items (None: as many as allowed) may take: no longer than
        its items could (their timeout: the version's own limit, else its tier's) plus a cold start,
        and than the configured deadline; never less than one item's timeout plus a cold start."""
        key = (script_id, version)
        item = self._item_timeouts.get(key)
        if item is None:
            meta = self.invoker.version(script_id, version)[0]
            timeout_ms = meta.limits.timeout_ms if meta.limits and meta.limits.timeout_ms else None
            tier = self.cfg.tier(meta.tier or "pro")
            item = self._item_timeouts[key] = (timeout_ms or (tier.timeout_ms if tier else 0)) / 1000
        longest = self.cfg.scheduler_invoke_timeout_s if items is None else \
            min(self.cfg.scheduler_invoke_timeout_s, items * item + DEADLINE_MARGIN_S)
        return max(item + DEADLINE_MARGIN_S, longest)
