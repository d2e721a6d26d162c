"""Peak memory of ``kvckpt cp`` store→folder and ``kvckpt drain``, measured in a fresh process.

tests/peak_rss.py runs the command in its own process and reports the rise of the kernel's RSS
high-water mark above the baseline taken after imports. The checkpoint is 64 MiB (one 48 MiB tensor
and sixteen of 1 MiB); with a 2 MiB buffer a bounded copy stays far below the checkpoint's size
(about 15 MiB of it is the command's fixed cost: clients, threads, code first run), while holding it
whole (as FileSystemWriter does with one file per rank) does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

import kvckpt
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal
from tests.ranks import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

#: Half the 64 MiB checkpoint; twice what a 2 MiB buffer plus the fixed cost measure.
BOUND_MIB = 32


def checkpoint() -> dict[str, torch.Tensor]:
    state = {"big": torch.arange(12 << 20, dtype=torch.float32).reshape(12288, 1024)}
    state.update({f"small{i}": torch.full((512, 512), float(i)) for i in range(16)})
    return state


def peak_above_baseline(*args: str) -> float:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "peak_rss.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, done.stderr
    return float(report["peak_mib"])


def assert_copied(folder: Path) -> None:
    loaded = {name: torch.zeros_like(value) for name, value in checkpoint().items()}
    dcp_load(loaded, storage_reader=FileSystemReader(folder), no_dist=True)
    for name, value in checkpoint().items():
        assert bits_equal(loaded[name], value), name


@pytest.mark.parametrize("command", ["cp", "drain"])
def test_store_to_folder_holds_about_the_buffer_not_the_checkpoint(
    redis_server: RedisServer, namespace: str, tmp_path: Path, command: str
) -> None:
    kvckpt.save(checkpoint(), redis_server.url(f"{namespace}/step1"), no_dist=True)
    if command == "cp":
        folder = tmp_path / "copy"
        args = ["cp", "--buffer-mib", "2", redis_server.url(f"{namespace}/step1"), str(folder)]
    else:
        folder = tmp_path / "durable" / "step1"
        args = [
            "drain",
            "--once",
            "--buffer-mib",
            "2",
            redis_server.url(namespace),
            str(tmp_path / "durable"),
        ]
    peak = peak_above_baseline(*args)
    assert_copied(folder)
    assert peak < BOUND_MIB, f"{command} held {peak:.1f} MiB above its baseline copying 64 MiB"
