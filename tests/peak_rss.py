"""Run ``kvckpt ARGS...`` in this process and print how far its peak RSS rose above the baseline.

    python tests/peak_rss.py ARGS...   ->   last stdout line: {"rc": 0, "baseline_mib": .., "peak_mib": ..,
                                                             "seconds": ..}

The baseline is taken after importing everything the command uses (torch, DCP, fsspec), and the
kernel's high-water mark is reset there (/proc/self/clear_refs), so the figure is what the command
itself held, and the command's wall time. Run in a fresh process: a parent's memory never counts.
benchmarks/drain_bench.py uses it too.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import kvckpt.tiered.copy
import kvckpt.tiered.drain  # noqa: F401
from kvckpt.cli import main as cli

with contextlib.suppress(ImportError):
    import s3fs  # noqa: F401  (a drain to s3:// imports it; the baseline should hold it)

MIB = 1 << 20


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> int:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    baseline = _status("VmRSS")
    started = time.perf_counter()
    rc = cli.main(sys.argv[1:])
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    print(
        json.dumps(
            {
                "rc": rc,
                "baseline_mib": baseline / MIB,
                "peak_mib": (peak - baseline) / MIB,
                "seconds": seconds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
