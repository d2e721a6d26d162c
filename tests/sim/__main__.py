"""``python -m tests.sim FIRST COUNT``: run seeds FIRST .. FIRST+COUNT-1 of the simulation.

Prints the first failing seeds' reports (the failure, then the trace), replays each once in this
process to confirm that the trace is the same, names the other failing seeds with their failure, and
ends with one ``SUMMARY`` line. Exit status 1 when a seed
failed. Run it with ``PYTHONHASHSEED=0`` for a trace that other processes reproduce (tests/sim's
test does).
"""

from __future__ import annotations

import sys
import time

from tests.sim.world import run_seed

#: Failing seeds whose whole trace is printed (and replayed); later ones get one line each.
FULL_REPORTS = 3


def main(argv: list[str]) -> int:
    first, count = int(argv[0]), int(argv[1])
    verbose = "--trace" in argv[2:]
    started = time.perf_counter()
    failed: list[int] = []
    steps = 0
    for seed in range(first, first + count):
        result = run_seed(seed)
        steps += result.steps
        if result.failure is None:
            if verbose:
                print(result.report())
            continue
        failed.append(seed)
        if len(failed) > FULL_REPORTS:
            print(f"FAILED seed {seed}: {result.failure}")
            continue
        print(result.report())
        again = run_seed(seed)
        same = again.trace == result.trace and again.failure == result.failure
        verdict = "the same trace" if same else "A DIFFERENT TRACE: the harness is not deterministic"
        print(f"REPLAY seed {seed}: {verdict}")
        sys.stdout.flush()
    seconds = time.perf_counter() - started
    print(f"SUMMARY seeds={count} steps={steps} failed={failed} seconds={seconds:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
