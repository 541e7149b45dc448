"""Progress bars and spinners for long interactive steps (data load, series, plots, image builds).

Why: interactive commands should say what they are waiting for, on one line that redraws itself,
without mixing log lines into their output. Drawn on stderr only when it is a terminal; elsewhere
(CI, pipes, tests) they are silent, so output stays clean and diffable.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

BAR_WIDTH = 28
SPIN = "|/-\\"


def _interactive(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """`with Progress(total, "label") as bar: ... bar.advance()`: a bar that redraws in place."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = _interactive(self.stream)
        self._last = 0.0

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.05 and self.done < self.total:
            return
        self._last = now
        filled = int(BAR_WIDTH * self.done / self.total)
        self.stream.write(f"\r{self.label} [{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {self.done}/{self.total}")
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def spinner(label: str, *, stream: TextIO | None = None) -> Iterator[None]:
    """A spinner while one blocking call runs (an HTTP request whose progress is not known)."""
    out = stream or sys.stderr
    if not _interactive(out):
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def spin() -> None:
        i = 0
        while not stop.wait(0.1):
            out.write(f"\r{label} {SPIN[i % len(SPIN)]} {time.monotonic() - started:.0f}s")
            out.flush()
            i += 1

    worker = threading.Thread(target=spin, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(timeout=1)
        out.write(f"\r{label} done in {time.monotonic() - started:.1f}s\n")
        out.flush()
