"""torchtitan's CheckpointManager saves to, prunes and resumes from a kvckpt URL folder."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

import kvckpt
from tests.harness.servers import RedisServer, free_port
from tests.jobs import finish, start

ROOT = Path(__file__).resolve().parent.parent

# torchtitan is its own extra, kept out of `test` (pyproject.toml says why); CI installs it and runs
# this file as a step of its own (.ci/run).
pytest.importorskip("torchtitan", reason="needs the torchtitan extra: pip install -e '.[test,torchtitan]'")


def job(folder: str, losses: Path, *extra: str) -> subprocess.Popen[bytes]:
    return start("torchtitan_job", folder, str(losses), "8", "--port", str(free_port()), *extra)


def steps_in(url: str) -> list[str]:
    return sorted(info.namespace.rsplit("/", 1)[-1] for info in kvckpt.list_checkpoints(url))


def losses_of(path: Path) -> list[tuple[int, float]]:
    rows = (line.split() for line in path.read_text().splitlines())
    return [(int(step), float(loss)) for step, loss in rows]


@pytest.mark.slow
def test_killed_save_is_skipped_and_resume_matches(redis_server: RedisServer, tmp_path: Path) -> None:
    run = f"titan-{uuid.uuid4().hex[:8]}"
    straight_url, killed_url = redis_server.url(f"{run}/straight"), redis_server.url(f"{run}/killed")
    straight = job(straight_url, tmp_path / "straight.txt")
    killed = job(killed_url, tmp_path / "killed.txt", "--die-in-save-at", "6")
    assert finish(straight) == 0
    assert finish(killed) == -9  # SIGKILLed while the step-6 save wrote its data

    assert steps_in(straight_url) == ["step-6", "step-8"]  # keep_latest_k=2 pruned through fsspec
    assert steps_in(killed_url) == ["step-2", "step-4"]  # step-6 has data keys but no record

    assert finish(job(killed_url, tmp_path / "resumed.txt")) == 0
    expected = dict(losses_of(tmp_path / "straight.txt"))
    resumed = losses_of(tmp_path / "resumed.txt")
    assert resumed == [(step, expected[step]) for step in range(5, 9)]  # resumed from step-4
