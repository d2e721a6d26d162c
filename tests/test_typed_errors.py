"""kvckpt.save/load raise typed kvckpt errors (Exceptions) for common mistakes, against a real redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import fakeredis
import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlan

import kvckpt
from kvckpt.errors import (
    InvalidCheckpointIdError,
    InvalidStoreOptionError,
    KVCheckpointError,
    StateDictMismatchError,
    UnpicklableValueError,
)
from tests.harness.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def test_shape_mismatch_names_the_entry_and_both_shapes(redis_server: RedisServer, namespace: str) -> None:
    url = redis_server.url(namespace)
    kvckpt.save({"layer.w": torch.ones(4, 3), "n": 1}, url)
    with pytest.raises(StateDictMismatchError) as raised:
        kvckpt.load({"layer": {"w": torch.zeros(5, 3, dtype=torch.bfloat16)}, "n": 0}, url)
    message = str(raised.value)
    assert isinstance(raised.value, Exception)
    assert "'layer.w'" in message and "shape (4, 3), dtype float32" in message
    assert "shape (5, 3), dtype bfloat16" in message and "FrameSummary" not in message
    assert (raised.value.saved, raised.value.wanted) == ((4, 3), (5, 3))  # type: ignore[attr-defined]


def test_a_key_missing_from_the_checkpoint(redis_server: RedisServer, namespace: str) -> None:
    url = redis_server.url(namespace)
    kvckpt.save({"w": torch.ones(4)}, url)
    with pytest.raises(
        StateDictMismatchError, match=r"'extra' is in the state_dict but not in the checkpoint"
    ):
        kvckpt.load({"w": torch.zeros(4), "extra": torch.zeros(2)}, url)


def test_an_unpicklable_value(redis_server: RedisServer, namespace: str) -> None:
    url = redis_server.url(namespace)
    with pytest.raises(UnpicklableValueError, match=r"'hook': a function cannot be saved"):
        kvckpt.save({"w": torch.ones(4), "hook": lambda: 1}, url)
    assert kvckpt.list_checkpoints(url) == []


def test_a_typo_in_store_options(redis_server: RedisServer, namespace: str) -> None:
    with pytest.raises(InvalidStoreOptionError, match=r"'timout'.*did you mean 'timeout'"):
        kvckpt.save({"w": torch.ones(4)}, redis_server.url(namespace), store_options={"timout": 5})
    with pytest.raises(InvalidStoreOptionError, match="'conect_timeout'"):
        kvckpt.load({"w": torch.ones(4)}, redis_server.url(namespace), store_options={"conect_timeout": 5})
    with pytest.raises(InvalidStoreOptionError):
        kvckpt.list_checkpoints(redis_server.url(namespace), timout=5)


def test_other_dcp_failures_are_a_kvckpt_error_with_each_ranks_reason(
    redis_server: RedisServer, namespace: str
) -> None:
    url = redis_server.url(namespace)
    kvckpt.save({"w": torch.ones(4)}, url)

    class Broken(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            raise RuntimeError("planner broke")

    with pytest.raises(KVCheckpointError, match=r"load failed: rank 0: RuntimeError: planner broke"):
        kvckpt.load({"w": torch.zeros(4)}, url, planner=Broken())


def test_client_with_a_full_url_is_refused(redis_server: RedisServer) -> None:
    url = redis_server.url("run1/step1").replace("127.0.0.1", "user:pw@127.0.0.1")
    with pytest.raises(InvalidCheckpointIdError, match="not a URL") as raised:
        kvckpt.save({"w": torch.ones(4)}, url, client=fakeredis.FakeRedis())
    assert ":pw@" not in str(raised.value)


def test_ctrl_c_during_a_save_is_a_plain_keyboard_interrupt(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    url = redis_server.url(namespace)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.stalled_save", url, "60", str(tmp_path / "never")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "stalled"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert err.strip().splitlines()[-1] == "KeyboardInterrupt", err
    assert "CheckpointException" not in err
    assert process.returncode == -signal.SIGINT  # Python's own exit for an unhandled Ctrl-C
    assert kvckpt.list_checkpoints(url) == [] and kvckpt.list_orphans(url) == []  # it cleaned up
