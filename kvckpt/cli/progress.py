"""A one-line progress bar on stderr, in the units the command's summary line uses.

Sizes in binary units (humanize.size), throughput in decimal MB/s or GB/s (humanize.rate), and an ETA,
redrawn at most ten times a second. It draws only on a terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from kvckpt import humanize

_REDRAW_SECONDS = 0.1


class Bar:
    def __init__(self, total: int | None, label: str, stream: TextIO) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.done = 0
        self._started = time.perf_counter()
        self._drawn = 0.0
        self._lock = threading.Lock()  # verify reports from its I/O threads

    def update(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.perf_counter()
            if now - self._drawn >= _REDRAW_SECONDS:
                self._drawn = now
                self._draw(now)

    def line(self, now: float) -> str:
        seconds = now - self._started
        text = f"{self.label}: {humanize.size(self.done)}"
        if self.total:
            share = min(1.0, self.done / self.total)
            text += f" / {humanize.size(self.total)} {share * 100:3.0f}%"
            if self.done and seconds > 0:
                left = seconds * (self.total - self.done) / self.done
                text += f", ETA {humanize.duration(max(0.0, left))}"
        return f"{text}, {humanize.rate(self.done, seconds)}"

    def _draw(self, now: float) -> None:
        self.stream.write("\r\x1b[2K" + self.line(now))
        self.stream.flush()

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


@contextmanager
def progress_bar(total: int | None, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A bar on stderr when it is a terminal; a no-op callback otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    bar = Bar(total, label, sys.stderr)
    try:
        yield bar.update
    finally:
        bar.clear()
