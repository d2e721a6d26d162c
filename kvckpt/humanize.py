"""Sizes, ages and tables as people read them (the CLI and the demo print these)."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Sequence

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(nbytes: float) -> str:
    """1536 → '1.5 KiB'; binary units, as memory is counted."""
    value = float(nbytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def rate(nbytes: float, seconds: float) -> str:
    """Throughput in decimal GB/s or MB/s, as networks and disks are rated."""
    if seconds <= 0:
        return "-"
    per_second = nbytes / seconds
    return f"{per_second / 1e9:.2f} GB/s" if per_second >= 1e9 else f"{per_second / 1e6:.0f} MB/s"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def timestamp(when: float) -> str:
    """Local time to the second: '2026-11-28 17:35:45'."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def age(when: float, now: float | None = None) -> str:
    """'4 min ago', or 'in 2 h' for a time still ahead."""
    delta = (time.time() if now is None else now) - when
    if abs(delta) < 1:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(-delta)}"


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: a wide East Asian character two, a combining mark none."""
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell, in terminal columns (display_width); indexes in
    ``right`` are right-aligned (numbers)."""
    widths = [max(display_width(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padding = [" " * (widths[i] - display_width(str(cell))) for i, cell in enumerate(cells)]
        padded = [
            f"{pad}{cell}" if i in right else f"{cell}{pad}"
            for i, (cell, pad) in enumerate(zip(cells, padding, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def printable(text: str, limit: int = 200) -> str:
    """``text`` with control characters (terminal escapes included) shown as escapes, and capped:
    for text that comes from a store or a pickle and is put in a message."""
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return shown if len(shown) <= limit else shown[:limit] + "…"
