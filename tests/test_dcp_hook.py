"""Plain DCP with a kvckpt URL as checkpoint_id, after kvckpt.install()."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException

import kvckpt
from kvckpt.integrations.fsview import KVCheckpointFileSystem
from kvckpt.integrations.hook import installed
from kvckpt.integrations.torch_private import PROCESS_EXECUTE_SAVE, STORAGE_SETUP
from tests.harness.servers import RedisServer, free_port

#: torch's own functions, read when pytest imports this file, before any test has run install().
ORIGINALS = [point.get() for point in (*STORAGE_SETUP, PROCESS_EXECUTE_SAVE)]


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    kvckpt.install()
    return redis_server.url(f"hook-{uuid.uuid4().hex[:12]}")


def test_install_is_idempotent() -> None:
    kvckpt.install()
    kvckpt.install()
    assert installed()


def patched_now() -> list[Any]:
    return [point.get() for point in (*STORAGE_SETUP, PROCESS_EXECUTE_SAVE)]


def same_objects(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def test_uninstall_puts_back_torch_functions_and_install_works_again(url: str) -> None:
    assert not any(same_objects([now], [then]) for now, then in zip(patched_now(), ORIGINALS, strict=True))
    try:
        kvckpt.uninstall()
        assert not installed() and same_objects(patched_now(), ORIGINALS)
        kvckpt.uninstall()  # idempotent
        assert same_objects(patched_now(), ORIGINALS)
    finally:
        kvckpt.install()
    assert installed()
    dcp.save({"w": torch.ones(2)}, checkpoint_id=f"{url}/again")
    assert kvckpt.info(f"{url}/again").entries[0].fqn == "w"


UNINSTALLED_SAVE = """
import sys, fsspec, pytest, torch, torch.distributed.checkpoint as dcp, kvckpt
url = sys.argv[1]
kvckpt.install()
kvckpt.install()
kvckpt.uninstall()
with pytest.raises(ValueError, match="Protocol not known"):
    fsspec.filesystem("redis", server_url=url)  # the fsspec view is gone with the hook
with pytest.raises(RuntimeError, match="Cannot detect which StorageReader or StorageWriter"):
    dcp.save({"w": torch.ones(2)}, checkpoint_id=url + "/gone", no_dist=True)
with pytest.raises(RuntimeError, match="Cannot detect which StorageReader or StorageWriter"):
    dcp.load({"w": torch.ones(2)}, checkpoint_id=url + "/gone", no_dist=True)
kvckpt.install()
dcp.save({"w": torch.ones(2)}, checkpoint_id=url + "/back", no_dist=True)
"""


def test_after_uninstall_dcp_treats_a_url_as_torch_does(url: str, tmp_path: Path) -> None:
    """In a fresh process, so fsspec has no registration from another test: after uninstall DCP
    raises its own error for a kvckpt URL, and writes neither to the store nor to a local folder."""
    subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(UNINSTALLED_SAVE), url],
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert [info.namespace.rsplit("/", 1)[-1] for info in kvckpt.list_checkpoints(url)] == ["back"]
    assert list(tmp_path.iterdir()) == []


def test_save_and_load_by_url(url: str) -> None:
    weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    dcp.save({"w": weights, "step": 7}, checkpoint_id=f"{url}/step7")
    assert [info.namespace.rsplit("/", 1)[-1] for info in kvckpt.list_checkpoints(url)] == ["step7"]
    loaded: dict[str, Any] = {"w": torch.zeros(3, 4), "step": 0}
    dcp.load(loaded, checkpoint_id=f"{url}/step7")
    assert torch.equal(loaded["w"], weights) and loaded["step"] == 7


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


def test_objects_load_without_unpickling_unless_the_planner_allows(url: str) -> None:
    dcp.save({"w": torch.ones(2), "thing": Opaque(5)}, checkpoint_id=f"{url}/o")
    with pytest.raises(CheckpointException, match="a safe load does not construct"):
        dcp.load({"w": torch.zeros(2), "thing": None}, checkpoint_id=f"{url}/o")
    loaded = {"w": torch.zeros(2), "thing": None}
    dcp.load(loaded, checkpoint_id=f"{url}/o", planner=kvckpt.SafeLoadPlanner(allow_pickle=True))
    assert isinstance(loaded["thing"], Opaque) and loaded["thing"].value == 5


def test_paths_still_go_to_dcp_filesystem(tmp_path: object) -> None:
    kvckpt.install()
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path))
    loaded = {"w": torch.zeros(3)}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    assert torch.equal(loaded["w"], torch.ones(3))


def test_async_save_thread(url: str) -> None:
    future = dcp.async_save({"w": torch.full((5,), 2.0)}, checkpoint_id=f"{url}/a")
    assert isinstance(future, concurrent.futures.Future)
    future.result()
    loaded = {"w": torch.zeros(5)}
    kvckpt.load(loaded, f"{url}/a")
    assert torch.equal(loaded["w"], torch.full((5,), 2.0))


PROCESS_SAVE = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp, kvckpt
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
kvckpt.install()
dcp.async_save(
    {"w": torch.full((6,), 3.0)}, checkpoint_id=sys.argv[1],
    async_checkpointer_type=AsyncCheckpointerType.PROCESS,
).result(timeout=120)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_async_save_process_resolves_url_in_child(url: str) -> None:
    """The checkpoint process is spawned and never ran install(); the save still lands in kvckpt."""
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROCESS_SAVE), f"{url}/p", str(free_port())],
        check=True,
        timeout=240,
    )
    assert kvckpt.info(f"{url}/p").num_tensors == 1
    loaded = {"w": torch.zeros(6)}
    dcp.load(loaded, checkpoint_id=f"{url}/p")
    assert torch.equal(loaded["w"], torch.full((6,), 3.0))


def test_fsspec_protocol_does_not_route_dcp_through_fsspecwriter(url: str) -> None:
    """install() registers an fsspec protocol for redis://, which FsspecWriter then accepts; DCP must
    still pick kvckpt's writer, and FsspecWriter must fail rather than store its own file format."""
    assert isinstance(fsspec.filesystem("redis", server_url=url), KVCheckpointFileSystem)
    assert FsspecWriter.validate_checkpoint_id(f"{url}/f")  # the trap is armed
    dcp.save({"w": torch.ones(2)}, checkpoint_id=f"{url}/f")
    assert kvckpt.info(f"{url}/f").entries[0].fqn == "w"  # kvckpt's record, not a .distcp file
    with pytest.raises(CheckpointException, match=r"KVCheckpointError: .*kvckpt\.install"):
        dcp.save({"w": torch.ones(2)}, storage_writer=FsspecWriter(f"{url}/g"))
    assert kvckpt.list_checkpoints(f"{url}/g") == []


KILLED_SAVE = """
import os, signal, sys, torch, torch.distributed.checkpoint as dcp, kvckpt

class DiesWhenSaved:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

kvckpt.install()
dcp.save({"w": torch.full((1000,), 9.0), "bomb": DiesWhenSaved()}, checkpoint_id=sys.argv[1])
"""


@pytest.mark.slow
def test_killed_save_is_never_loaded(url: str) -> None:
    dcp.save({"w": torch.full((1000,), 1.0)}, checkpoint_id=f"{url}/step1")
    died = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_SAVE), f"{url}/step2"], timeout=120)
    assert died.returncode == -9
    assert kvckpt.latest(url) == f"{url}/step1"
    with pytest.raises(CheckpointException, match="no committed checkpoint"):
        dcp.load({"w": torch.zeros(1000)}, checkpoint_id=f"{url}/step2")
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.ls(path, detail=False) == [f"{path}/step1"]
