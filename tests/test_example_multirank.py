"""The README's torchrun example: save on 4 ranks, resume on 2, the same next-step loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.harness.servers import RedisServer
from tests.ranks import ROOT

pytestmark = pytest.mark.slow


def torchrun(ranks: int, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    done = subprocess.run(
        [*command, "examples/multirank.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_torchrun_example_resumes_on_fewer_ranks(redis_server: RedisServer, namespace: str) -> None:
    url = redis_server.url(f"{namespace}/example")
    saved = torchrun(4, "--save", "--url", url)
    resumed = torchrun(2, "--url", url)
    first = re.search(r"saved on 4 ranks after 3 steps; next step's loss (\S+)", saved)
    second = re.search(r"resumed on 2 ranks after 3 steps; next step's loss (\S+)", resumed)
    assert first and second, saved + resumed
    assert first.group(1) == second.group(1)
