"""JSON-lines logging; every line carries the call id of the request being served."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

call_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("call_id", default="-")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "call_id": call_id_var.get(),
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a line is logged, not what it was at set-up: a test
    runner swaps stderr per test and closes the old one, which a daemon thread may still log to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup(level: str = "INFO") -> None:
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)


class ConsoleFormatter(logging.Formatter):
    """One short line for a person: `warning: message` (errors keep their traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_console(level: str = "WARNING") -> None:
    """Interactive commands (demo, run, the API verbs): no JSON log lines among their output, only
    warnings and errors, plainly. Services keep `setup()`'s JSON lines."""
    handler = StderrHandler()
    handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def get(name: str) -> logging.Logger:
    return logging.getLogger(name)


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one structured event; fields become top-level JSON keys."""
    logger.log(level, msg, extra={"fields": fields})
