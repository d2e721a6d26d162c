"""The fsspec directory view of committed checkpoints that frameworks list, probe and prune."""

from __future__ import annotations

import fsspec
import pytest
import torch

import kvckpt
from kvckpt.integrations.fsview import KVCheckpointFileSystem, register_fsspec


@pytest.fixture
def fs(kvckpt_url: str) -> KVCheckpointFileSystem:
    register_fsspec()
    for name in ("run1/step-2", "run1/step-4", "run2/step-1"):
        kvckpt.save({"w": torch.ones(2)}, f"{kvckpt_url}/{name}")
    found, _ = fsspec.core.url_to_fs(kvckpt_url)
    assert isinstance(found, KVCheckpointFileSystem)
    return found


def test_checkpoints_are_folders_holding_their_record(fs: KVCheckpointFileSystem) -> None:
    assert fs.ls("checkpoints", detail=False) == ["checkpoints/run1", "checkpoints/run2"]
    assert fs.ls("checkpoints/run1", detail=False) == ["checkpoints/run1/step-2", "checkpoints/run1/step-4"]
    assert fs.ls("checkpoints/run1/step-2", detail=False) == ["checkpoints/run1/step-2/.metadata"]
    assert fs.isdir("checkpoints/run1") and fs.isdir("checkpoints/run1/step-4")
    assert fs.isfile("checkpoints/run1/step-4/.metadata")
    assert not fs.exists("checkpoints/run1/step-6") and not fs.exists("checkpoints/run3")
    assert not fs.isfile("checkpoints/run1/.metadata")
    assert fs.modified("checkpoints/run1") >= fs.modified("checkpoints/run1/step-2")


def test_a_save_that_never_committed_does_not_exist(fs: KVCheckpointFileSystem, kvckpt_url: str) -> None:
    store = kvckpt.open_store(f"{kvckpt_url}/x")
    store.put("checkpoints/run1/step-6/g00000000T000000-00000000/w/0/0", b"data without a record")
    assert fs.ls("checkpoints/run1", detail=False) == ["checkpoints/run1/step-2", "checkpoints/run1/step-4"]
    assert not fs.exists("checkpoints/run1/step-6")


def test_rm_deletes_checkpoints(fs: KVCheckpointFileSystem, kvckpt_url: str) -> None:
    with pytest.raises(IsADirectoryError):
        fs.rm("checkpoints/run1")
    fs.rm(f"{kvckpt_url}/run1/step-2")
    assert kvckpt.latest(f"{kvckpt_url}/run1") == f"{kvckpt_url}/run1/step-4"
    fs.rm("checkpoints/run1", recursive=True)
    assert kvckpt.list_checkpoints(f"{kvckpt_url}/run1") == []
    assert fs.exists("checkpoints/run2/step-1")
    with pytest.raises(FileNotFoundError):
        fs.rm("checkpoints/run1", recursive=True)


def test_nothing_is_written_through_the_view(fs: KVCheckpointFileSystem) -> None:
    fs.makedirs("checkpoints/new", exist_ok=True)  # directories are implied: a no-op
    with pytest.raises(kvckpt.KVCheckpointError, match=r"kvckpt\.install"):
        fs.open("checkpoints/new/.metadata", "wb")
    assert not fs.exists("checkpoints/new")
