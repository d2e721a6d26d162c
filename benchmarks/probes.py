"""The figures that tell which resource bounds a benchmark row.

A row's wall time alone cannot say whether the client's CPU, the server's CPU or the kernel's page
faults were the limit; these helpers take the per-process counters from ``/proc/<pid>/stat`` around a
phase (CPU seconds of all threads, minor and major faults) and the machine's two memory speeds that
bound a copy: memcpy between touched buffers, and writing into freshly mapped memory, where every
4 KiB page costs a fault and the kernel's zeroing first. Only the standard library is used (ctypes'
memmove/memset are libc's), so the numbers do not depend on numpy or torch being installed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PAGE = mmap.PAGESIZE
MIB = 1 << 20


@dataclass(frozen=True)
class Usage:
    """What a process (all its threads) has spent so far: CPU seconds (user + system) and faults."""

    cpu_s: float = 0.0
    minor_faults: int = 0
    major_faults: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu_s + other.cpu_s,
            self.minor_faults + other.minor_faults,
            self.major_faults + other.major_faults,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu_s - other.cpu_s,
            self.minor_faults - other.minor_faults,
            self.major_faults - other.major_faults,
        )


def parse_stat(text: str, ticks_per_s: int) -> Usage:
    """Usage from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself hold spaces or ``)``, so the fields
    are counted from the last ``)``: minflt, majflt, utime and stime are fields 10, 12, 14 and 15 of
    proc(5), i.e. indexes 7, 9, 11 and 12 after it.
    """
    head, sep, tail = text.rpartition(")")
    fields = tail.split()
    if not sep or not head or len(fields) < 13:
        raise ValueError(f"not the contents of /proc/<pid>/stat: {text[:80]!r}")
    cpu_ticks = int(fields[11]) + int(fields[12])
    return Usage(cpu_ticks / ticks_per_s, int(fields[7]), int(fields[9]))


def usage(pids: Iterable[int | str] = ("self",)) -> Usage:
    """The summed usage of ``pids`` (``"self"`` is this process) now."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = Usage()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            total += parse_stat(stat.read(), ticks)
    return total


@dataclass(frozen=True)
class Spread:
    """A sample's median with its range and quartiles: one run on a shared machine can mislead."""

    median: float
    low: float
    high: float
    q1: float
    q3: float

    def text(self, digits: int = 3) -> str:
        """``median [min-max]``; the range alone when there is one sample is just the value."""
        if self.low == self.high:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("a spread needs at least one value")
    ordered = sorted(values)
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Spread(statistics.median(ordered), ordered[0], ordered[-1], q1, q3)


def speedup(baseline_s: float, candidate_s: float) -> float:
    """How many times faster the candidate is: > 1 when it took less time than the baseline."""
    if baseline_s <= 0 or candidate_s <= 0:
        raise ValueError(f"durations must be positive, got {baseline_s} and {candidate_s}")
    return baseline_s / candidate_s


def paired_speedups(baseline_s: Sequence[float], candidate_s: Sequence[float]) -> list[float]:
    """Speedups of runs made side by side (the i-th of each in the same repetition), so a burst of
    load on the machine that slowed one repetition slows both sides of its ratio."""
    if len(baseline_s) != len(candidate_s):
        raise ValueError(f"{len(baseline_s)} baseline runs but {len(candidate_s)} candidate runs")
    return [speedup(b, c) for b, c in zip(baseline_s, candidate_s, strict=True)]


def busy(cpu_s: float, wall_s: float) -> float:
    """CPU seconds per wall second: near 1.0 a single-threaded process was the bound."""
    return cpu_s / wall_s if wall_s > 0 else 0.0


def memcpy_gb_s(mib: int = 256, tries: int = 3) -> float:
    """libc memcpy between two buffers already faulted in: the speed of a copy with no faults."""
    size = mib * MIB
    src, dst = (ctypes.c_char * size)(), (ctypes.c_char * size)()
    ctypes.memset(src, 1, size)
    ctypes.memset(dst, 0, size)
    seconds = []
    for _ in range(tries):
        started = time.perf_counter()
        ctypes.memmove(dst, src, size)
        seconds.append(time.perf_counter() - started)
    return size / min(seconds) / 1e9


def first_touch(mib: int = 256, tries: int = 3) -> tuple[float, float]:
    """(GB/s, µs per page) of writing into fresh anonymous memory: every page is a fault and a
    zeroing by the kernel before the write, what a server pays to store values in memory it has not
    used before. The µs per page is the cost over writing the same, already touched, pages."""
    size = mib * MIB
    fresh: list[float] = []
    touched: list[float] = []
    for _ in range(tries):
        with mmap.mmap(-1, size) as region:
            view = (ctypes.c_char * size).from_buffer(region)
            for into in (fresh, touched):
                started = time.perf_counter()
                ctypes.memset(view, 1, size)
                into.append(time.perf_counter() - started)
            del view  # the mmap cannot close while a ctypes view exports its buffer
    extra = max(min(fresh) - min(touched), 0.0)
    return size / min(fresh) / 1e9, extra / (size // PAGE) * 1e6


def memory_speeds(mib: int = 256) -> dict[str, float]:
    """The machine's memcpy and first-touch bandwidth, measured once at a benchmark's start."""
    touch_gb_s, fault_us = first_touch(mib)
    return {"memcpy_gb_s": memcpy_gb_s(mib), "first_touch_gb_s": touch_gb_s, "fault_us_per_page": fault_us}
