"""Run ``kvckpt ARGS...`` in this process and print how far its peak RSS rose above the baseline.

    python tests/peak_rss.py ARGS...   ->   last stdout line: {"rc": 0, "baseline_mib": .., "peak_mib": ..}

The baseline is taken after importing everything the command uses (torch, DCP, fsspec), and the
kernel's high-water mark is reset there (/proc/self/clear_refs), so the figure is what the command
itself held. Run in a fresh process: a parent's memory never counts.
"""

from __future__ import annotations

import json
import sys

import kvckpt.dcp.copy
import kvckpt.dcp.drain  # noqa: F401
from kvckpt import cli

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
    rc = cli.main(sys.argv[1:])
    peak = _status("VmHWM")
    print(json.dumps({"rc": rc, "baseline_mib": baseline / MIB, "peak_mib": (peak - baseline) / MIB}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
