"""The arithmetic and /proc parsing the benchmarks' resource tables rest on: a wrong field index or
a ratio turned upside down would print plausible numbers that say the wrong thing."""

from __future__ import annotations

import os
import resource

import pytest

from benchmarks import probes

#: proc(5) order after the command name: state ppid pgrp session tty_nr tpgid flags minflt cminflt
#: majflt cmajflt utime stime cutime cstime ...
STAT = "4242 (redis-server) *:6379) S 1 4242 4242 0 -1 4194560 1500 77 3 9 250 130 5 6 20 0 4 0"


def test_parse_stat_counts_fields_from_the_last_parenthesis() -> None:
    used = probes.parse_stat(STAT, ticks_per_s=100)
    assert used == probes.Usage(cpu_s=3.8, minor_faults=1500, major_faults=3)


def test_parse_stat_refuses_text_that_is_not_a_stat_line() -> None:
    with pytest.raises(ValueError, match="/proc/<pid>/stat"):
        probes.parse_stat("4242 S 1", ticks_per_s=100)


def test_usage_of_this_process_matches_getrusage() -> None:
    before = probes.usage([os.getpid()])
    rusage = resource.getrusage(resource.RUSAGE_SELF)
    after = probes.usage()
    assert before.minor_faults <= rusage.ru_minflt <= after.minor_faults
    assert before.major_faults <= rusage.ru_majflt <= after.major_faults
    assert after.cpu_s >= before.cpu_s > 0


def test_usage_differences_and_sums_go_field_by_field() -> None:
    a, b = probes.Usage(2.5, 100, 3), probes.Usage(0.5, 40, 1)
    assert a - b == probes.Usage(2.0, 60, 2)
    assert a + b == probes.Usage(3.0, 140, 4)


def test_spread_gives_median_range_and_quartiles() -> None:
    got = probes.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert got == probes.Spread(median=3.0, low=1.0, high=5.0, q1=2.0, q3=4.0)
    assert got.text(1) == "3.0 [1.0-5.0]"
    assert probes.spread([0.25]).text(2) == "0.25"
    with pytest.raises(ValueError, match="at least one"):
        probes.spread([])


def test_speedup_is_above_one_when_the_candidate_is_faster() -> None:
    assert probes.speedup(baseline_s=2.0, candidate_s=0.5) == 4.0
    assert probes.paired_speedups([1.0, 3.0], [2.0, 1.0]) == [0.5, 3.0]
    with pytest.raises(ValueError, match="positive"):
        probes.speedup(1.0, 0.0)
    with pytest.raises(ValueError, match="2 baseline runs but 1 candidate"):
        probes.paired_speedups([1.0, 2.0], [1.0])


def test_busy_is_cpu_per_wall_second() -> None:
    assert probes.busy(cpu_s=0.5, wall_s=2.0) == 0.25
    assert probes.busy(cpu_s=0.5, wall_s=0.0) == 0.0
