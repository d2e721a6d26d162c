"""Training scripts the integration tests run as real processes (killed with SIGKILL mid-save)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def start(module: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m tests.jobs.MODULE ARGS`` from this checkout, its output kept for a failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", f"tests.jobs.{module}", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen[bytes]) -> int:
    """The job's exit status: 0, or -9 when the test's SIGKILL ended it; anything else fails the test."""
    output, _ = process.communicate(timeout=240)
    if process.returncode not in (0, -9):
        pytest.fail(f"training job failed ({process.returncode}):\n{output.decode()[-3000:]}")
    return process.returncode
