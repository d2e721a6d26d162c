"""fakeredis:// URLs, fakeredis served over TCP, and the pytest plugin's fixtures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import kvckpt
from kvckpt.errors import InvalidCheckpointIdError
from kvckpt.testing.fake_server import TcpServer, forget, fresh_url


def test_same_name_is_same_server_within_a_process() -> None:
    url = fresh_url("run1")
    kvckpt.save({"w": torch.arange(4.0)}, f"{url}/step1")
    loaded = {"w": torch.zeros(4)}
    kvckpt.load(loaded, f"{url}/step1")  # a new store object, the same server
    assert torch.equal(loaded["w"], torch.arange(4.0))
    assert kvckpt.latest(url) == f"{url}/step1"
    other = fresh_url("run1")
    assert kvckpt.list_checkpoints(other) == []


def test_forget_drops_the_data() -> None:
    url = fresh_url("run1")
    kvckpt.save({"w": torch.ones(2)}, f"{url}/s")
    forget(url.split("/")[2])
    assert kvckpt.latest(url) is None


@pytest.mark.parametrize(
    "bad", ["fakeredis:///ns", "fakeredis://a:1/ns", "fakeredis://a b/ns", "fakeredis://x"]
)
def test_bad_fakeredis_urls_are_typed_errors(bad: str) -> None:
    with pytest.raises(InvalidCheckpointIdError):
        kvckpt.latest(bad)


CHILD_SAVE = """
import sys, torch, kvckpt
kvckpt.save({"w": torch.full((3, 1 << 18), 7.0), "meta": {"step": 3}}, sys.argv[1])
"""


@pytest.mark.slow
def test_tcp_server_serves_other_processes() -> None:
    """A subprocess saves through redis://; this process reads the same data as fakeredis://."""
    with TcpServer() as server:
        subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD_SAVE), server.url("run/s3")], check=True)
        loaded: dict[str, Any] = {"w": torch.zeros(3, 1 << 18), "meta": {"step": 0}}
        kvckpt.load(loaded, f"fakeredis://{server.name}/run/s3")
        assert torch.equal(loaded["w"], torch.full((3, 1 << 18), 7.0)) and loaded["meta"] == {"step": 3}


def test_plugin_url_fixture_is_fresh_and_usable(kvckpt_url: str) -> None:
    assert kvckpt.list_checkpoints(kvckpt_url) == []
    kvckpt.save({"w": torch.zeros(1)}, f"{kvckpt_url}/a")
    assert kvckpt.latest(kvckpt_url) == f"{kvckpt_url}/a"


def test_plugin_tcp_fixture(kvckpt_tcp_url: str) -> None:
    assert kvckpt_tcp_url.startswith("redis://127.0.0.1:")
    kvckpt.save({"w": torch.ones(5)}, f"{kvckpt_tcp_url}/a")
    loaded = {"w": torch.zeros(5)}
    kvckpt.load(loaded, f"{kvckpt_tcp_url}/a")
    assert torch.equal(loaded["w"], torch.ones(5))


def test_plugin_real_server_fixture(kvckpt_redis_url: str) -> None:
    kvckpt.save({"w": torch.ones(2)}, f"{kvckpt_redis_url}/a")
    assert kvckpt.info(f"{kvckpt_redis_url}/a").num_tensors == 1


def test_a_killed_save_to_the_fakeredis_tcp_server_is_never_resumed(tmp_path: Path) -> None:
    """A training process saving through fakeredis over TCP dies mid-save: what a restart resumes
    from is the checkpoint before, and the dead save is an orphan, not a checkpoint."""
    from tests.test_orphans import Saver, wait_for

    with TcpServer() as server:
        prefix = server.url("run")
        kvckpt.save({"w": torch.ones(3)}, f"{prefix}/step1", step=1)
        saver = Saver(f"{prefix}/step2", 0.5, tmp_path / "go")  # writes all but one value, stalls
        saver.kill()
        assert kvckpt.latest(prefix) == f"{prefix}/step1"
        assert [c.namespace for c in kvckpt.list_checkpoints(prefix)] == ["run/step1"]
        wait_for(lambda: kvckpt.list_orphans(prefix), "the dead save's liveness marker to lapse")
        assert [o.namespace for o in kvckpt.list_orphans(prefix)] == ["run/step2"]
        loaded: dict[str, Any] = {"w": torch.zeros(3)}
        kvckpt.load(loaded, kvckpt.latest(prefix) or "")
        assert torch.equal(loaded["w"], torch.ones(3))
