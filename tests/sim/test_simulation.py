"""Deterministic simulation of kvckpt's protocol: many seeds, each one schedule of real actors.

Each seed draws a scenario (trainers saving with and without overwrite from hosts whose clocks
disagree, gc, keep_last, delete, a drainer to a ``memory://`` durable tier, committed checkpoints and
orphans already in the store) and the faults (lost replies, commits delivered late, actors paused
past the liveness TTL or killed, non-atomic SCANs), then runs kvckpt's own code one store operation
at a time and checks the invariants after every step (tests/sim/world.py says which).

By default 2,000 seeds run, about 150,000 scheduling steps in all, in two child processes (about
40 s on the 2-core development machine). ``KVCKPT_SIM_SEEDS=N`` runs N seeds, ``KVCKPT_SIM_SEED=S``
runs seed S alone and prints its trace. A failure prints the seed, the violated
invariant and the trace; the same seed replays exactly: the children run with ``PYTHONHASHSEED=0``,
as kvckpt iterates sets of strings whose order depends on the hash seed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SEEDS = 2000


def _children(first: int, count: int, jobs: int, trace: bool) -> list[tuple[int, str]]:
    """Run the seeds split over ``jobs`` child processes; (exit status, output) of each."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    share, extra = divmod(count, jobs)
    processes = []
    start = first
    for job in range(jobs):
        size = share + (job < extra)
        if size == 0:
            continue
        command = [sys.executable, "-m", "tests.sim", str(start), str(size)] + (["--trace"] if trace else [])
        processes.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
        start += size
    outputs = [p.communicate()[0] for p in processes]  # reads each pipe to its end: no child blocks
    return [(p.returncode, out) for p, out in zip(processes, outputs, strict=True)]


def test_simulation() -> None:
    single = os.environ.get("KVCKPT_SIM_SEED")
    if single is not None:
        first, count, jobs = int(single), 1, 1
    else:
        first, count = 0, int(os.environ.get("KVCKPT_SIM_SEEDS", DEFAULT_SEEDS))
        jobs = max(1, min(count, os.cpu_count() or 1))
    results = _children(first, count, jobs, trace=single is not None)
    output = "\n".join(out for _, out in results)
    summaries = re.findall(r"^SUMMARY seeds=(\d+) steps=(\d+) failed=\[(.*)\]", output, re.MULTILINE)
    failed = [int(s) for *_, found in summaries for s in found.split(",") if s.strip()]
    print(
        output if single is not None else "\n".join(line for line in output.splitlines() if "SUMMARY" in line)
    )
    assert len(summaries) == len(results), f"a simulation process did not finish:\n{output[-20000:]}"
    assert sum(int(seeds) for seeds, _, _ in summaries) == count
    assert not failed, (
        f"{len(failed)} of {count} seeds failed: {failed[:50]}; the first one's report (replay it with "
        f"KVCKPT_SIM_SEED={failed[0]} pytest tests/sim -q):\n" + _first_report(output, failed[0])
    )


def _first_report(output: str, seed: int) -> str:
    """The report of ``seed`` in the children's output (it starts with 'seed N:' and ends at REPLAY)."""
    start = output.find(f"seed {seed}: ")
    end = output.find(f"REPLAY seed {seed}:", start)
    return output[start : output.find("\n", end) if end >= 0 else len(output)]
