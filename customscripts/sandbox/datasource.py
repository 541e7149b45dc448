"""The DataSource contract the supervisor uses to answer the child's read calls (trusted side)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol, runtime_checkable

# when the read under way must have finished (time.monotonic()): the execution's wall-time end, set
# by the supervisor around each read so a data source never holds an execution past its timeout
read_deadline: ContextVar[float | None] = ContextVar("read_deadline", default=None)


class DependencyUnavailable(Exception):
    """A dependency script has no output; the execution fails with dependency_failed naming it."""

    def __init__(self, script_id: str, message: str | None = None) -> None:
        super().__init__(message or f"dependency {script_id!r} has no output available")
        self.script_id = script_id


class DependencyNotPublished(DependencyUnavailable):
    """A realtime read of a dependency found its series incomplete as of the event: the gateway named
    the bar ends (`bars`, epoch s) without an output. Another replica may still be publishing them, so
    the evaluation is retryable; the scheduler tries it again within its bounded attempts before the
    evaluation is final `dependency_failed`."""

    def __init__(self, script_id: str, bars: list[float], message: str | None = None) -> None:
        super().__init__(script_id, message)
        self.bars = bars


class DataAccessError(Exception):
    """The data source failed after retries; the execution fails with status error."""


class DataSourceUnavailable(DataAccessError):
    """The data source could not be reached, or failed on its side, after its retries: infrastructure,
    not the script. Only the trusted side raises it; it is what makes a result `retryable`."""


class DeadlineExceeded(DataAccessError):
    """The read could not finish before the execution's wall timeout (`read_deadline`)."""


class DataDenied(Exception):
    """The data source refused the read (403); the execution fails with status denied."""


@runtime_checkable
class DataSource(Protocol):
    def get_market_data(self, instrument_key: str, timeframe: str, *, limit: int | None = None,
                        start: float | None = None, end: float | None = None) -> dict: ...

    def get_metric(self, instrument_key: str, name: str, *, limit: int | None = None,
                   start: float | None = None, end: float | None = None) -> dict: ...

    def get_script_output(self, script_id: str, instrument_key: str, timeframe: str, *,
                          params: dict | None = None, history: int | None = None) -> dict: ...


@runtime_checkable
class ColumnFrames(Protocol):
    """Optional: market and metric reads as columns payloads (`protocol.columns_payload`), which the
    supervisor hands to the child without decoding a number. GatewayClient implements it."""

    def market_columns(self, instrument_key: str, timeframe: str, *, limit: int | None = None,
                       start: float | None = None, end: float | None = None) -> bytes: ...

    def metric_columns(self, instrument_key: str, name: str, *, limit: int | None = None,
                       start: float | None = None, end: float | None = None) -> bytes: ...
