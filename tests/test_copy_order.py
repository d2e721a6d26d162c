"""Which checkpoint is the latest, through restores and mixed steps, on real redis-server and etcd.

A copy keeps its source's step and commit time through a folder (the drainer's marker, or the
sidecar ``kvckpt cp`` writes), but never another store's clock: a restored copy sorts by its step,
and before every checkpoint committed with the destination's own clock. A prefix where any
checkpoint lacks a step is ordered by the store's commit clock alone, so the last save is the latest.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

import kvckpt
from kvckpt.tiered import origin
from tests.harness.servers import EtcdServer, RedisServer
from tests.test_cli import kvckpt_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((32, 4), float(step)), "trainer": {"step": step}}


def blank() -> dict[str, Any]:
    return {"w": torch.zeros(32, 4), "trainer": {"step": None}}


def names(infos: list[kvckpt.CheckpointInfo]) -> list[str]:
    return [i.namespace.rpartition("/")[2] for i in infos]


def loaded_step(checkpoint_id: str) -> int:
    loaded = blank()
    kvckpt.load(loaded, checkpoint_id, no_dist=True)
    assert torch.equal(loaded["w"], state(loaded["trainer"]["step"])["w"])
    return int(loaded["trainer"]["step"])


@pytest.mark.parametrize("stores", ["same-redis", "etcd-to-redis", "redis-to-etcd"])
def test_a_restore_from_the_durable_tier_keeps_its_step_and_sorts_before_this_stores_commits(
    redis_server: RedisServer, etcd_server: EtcdServer, namespace: str, tmp_path: Path, stores: str
) -> None:
    """`kvckpt cp DRAINED STORE` (docs/tiered.md) records the step and commit time the drainer
    recorded; the copy's commit clock was another store's (an etcd revision, a Redis TIME), so it
    is not carried: the restored copy sorts by its step, else before everything committed here."""
    source = etcd_server.url if stores == "etcd-to-redis" else redis_server.url
    dest = etcd_server.url if stores == "redis-to-etcd" else redis_server.url
    durable = str(tmp_path / "durable")
    for step in (1, 2):
        kvckpt.save(state(step), source(f"{namespace}/src/step{step}"), no_dist=True, step=step)
    assert kvckpt.Drainer(source(f"{namespace}/src"), durable).run(once=True) == 0
    (drained,) = kvckpt.durable_checkpoints(durable)
    assert (drained.name, drained.step) == ("step2", 2)
    kvckpt.delete(source(f"{namespace}/src/step2"))  # the store lost it
    if stores != "same-redis":
        kvckpt.delete(source(f"{namespace}/src/step1"))
        kvckpt.save(state(1), dest(f"{namespace}/src/step1"), no_dist=True, step=1)

    restored = kvckpt_cli("cp", drained.checkpoint_id, dest(f"{namespace}/src/step2"))
    assert restored.returncode == 0, restored.stderr
    prefix = dest(f"{namespace}/src")
    info = kvckpt.info(dest(f"{namespace}/src/step2"))
    assert (info.step, info.created, info.commit_clock) == (2, drained.created, None)
    assert kvckpt.latest(prefix) == dest(f"{namespace}/src/step2")
    assert names(kvckpt.keep_last(prefix, 1, dry_run=True)) == ["step1"]

    # A save without a step orders the prefix by this store's clock: the restored copy, whose clock
    # was another store's, comes before everything committed here, and the last save is the latest.
    kvckpt.save(state(3), dest(f"{namespace}/src/final"), no_dist=True)
    assert names(kvckpt.list_checkpoints(prefix)) == ["step2", "step1", "final"]
    assert kvckpt.latest(prefix) == dest(f"{namespace}/src/final")
    assert loaded_step(dest(f"{namespace}/src/step2")) == 2


def test_a_store_folder_store_round_trip_keeps_step_and_commit_time(
    redis_server: RedisServer, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_server.url
    kvckpt.save(state(1), url(f"{namespace}/a"), no_dist=True, step=1)
    kvckpt.save(state(2), url(f"{namespace}/b"), no_dist=True, step=2)
    original = kvckpt.info(url(f"{namespace}/b"))
    kvckpt.copy(url(f"{namespace}/b"), tmp_path / "b")
    kvckpt.copy(tmp_path / "b", tmp_path / "b-again")  # a folder copy carries it on

    for folder in (tmp_path / "b", tmp_path / "b-again"):
        sidecar = json.loads((folder / origin.SIDECAR).read_text())
        assert sidecar["format"] == origin.FORMAT
        assert (sidecar["step"], sidecar["created"]) == (2, original.created)
        assert (sidecar["commit_clock"], sidecar["save_id"]) == (original.commit_clock, original.save_id)
        plain = blank()  # still a plain DCP folder: stock DCP loads it
        dcp.load(plain, storage_reader=FileSystemReader(folder), no_dist=True)
        assert plain["trainer"]["step"] == 2 and torch.equal(plain["w"], state(2)["w"])

    kvckpt.delete(url(f"{namespace}/b"))
    kvckpt.copy(tmp_path / "b-again", url(f"{namespace}/b"))
    back = kvckpt.info(url(f"{namespace}/b"))
    assert (back.step, back.created, back.commit_clock) == (2, original.created, None)
    assert kvckpt.latest(url(namespace)) == url(f"{namespace}/b")
    assert names(kvckpt.keep_last(url(namespace), 1)) == ["a"]
    assert loaded_step(url(f"{namespace}/b")) == 2

    # dcp.save into the folder again: the sidecar names the .metadata it was written with, so the
    # new checkpoint there does not pass for step 2.
    dcp.save(state(7), storage_writer=FileSystemWriter(tmp_path / "b", overwrite=True), no_dist=True)
    with caplog.at_level(logging.WARNING, logger="kvckpt.tiered.origin"):
        kvckpt.copy(tmp_path / "b", url(f"{namespace}/resaved"))
    assert "describes another checkpoint" in caplog.text
    resaved = kvckpt.info(url(f"{namespace}/resaved"))
    assert resaved.step is None
    assert resaved.created == pytest.approx(os.stat(tmp_path / "b" / ".metadata").st_mtime, abs=1e-3)


def test_a_damaged_sidecar_is_a_typed_error_that_says_what_to_do(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    kvckpt.save(state(1), redis_server.url(f"{namespace}/a"), no_dist=True, step=1)
    kvckpt.copy(redis_server.url(f"{namespace}/a"), tmp_path / "a")
    (tmp_path / "a" / origin.SIDECAR).write_text('{"format": "kvckpt-source/1", "step": "ten"}')
    with pytest.raises(kvckpt.CorruptCheckpointError, match=r"step 'ten'.*delete that file"):
        kvckpt.copy(tmp_path / "a", redis_server.url(f"{namespace}/b"))
    assert kvckpt.list_checkpoints(redis_server.url(f"{namespace}/b")) == []


@pytest.mark.parametrize("store", ["redis", "etcd"])
def test_a_save_without_a_step_after_stepped_ones_is_the_latest(
    redis_server: RedisServer, etcd_server: EtcdServer, namespace: str, store: str
) -> None:
    """Mixed steps: the prefix is ordered by the store's clock (Redis TIME, etcd's revision), so
    keep_last never deletes the last save; a step recorded by some saves orders nothing then."""
    url = etcd_server.url if store == "etcd" else redis_server.url
    for name, step in (("s10", 10), ("s20", 20), ("s5", 5)):  # s5: a rerun from an earlier step
        kvckpt.save(state(step), url(f"{namespace}/{name}"), no_dist=True, step=step)
    assert names(kvckpt.list_checkpoints(url(namespace))) == ["s5", "s10", "s20"]  # all stepped
    kvckpt.save(state(99), url(f"{namespace}/final"), no_dist=True)

    assert names(kvckpt.list_checkpoints(url(namespace))) == ["s10", "s20", "s5", "final"]
    assert kvckpt.latest(url(namespace)) == url(f"{namespace}/final")
    listed = kvckpt_cli("ls", url(namespace))
    assert listed.returncode == 0 and f"latest: {url(namespace)}/final" in listed.stdout, listed
    assert names(kvckpt.keep_last(url(namespace), 1)) == ["s10", "s20", "s5"]
    assert names(kvckpt.list_checkpoints(url(namespace))) == ["final"]
    assert loaded_step(url(f"{namespace}/final")) == 99


def test_the_drainer_and_newest_restorable_take_a_save_without_a_step_as_the_newest(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    url, durable = redis_server.url(namespace), str(tmp_path / "durable")
    for step in (1, 2):
        kvckpt.save(state(step), redis_server.url(f"{namespace}/step{step}"), no_dist=True, step=step)
    assert kvckpt.Drainer(url, durable, keep=1).run(once=True) == 0
    kvckpt.save(state(3), redis_server.url(f"{namespace}/final"), no_dist=True)
    assert kvckpt.newest_restorable(url, durable) == redis_server.url(f"{namespace}/final")

    assert kvckpt.Drainer(url, durable, keep=1).run(once=True) == 0
    assert [(c.name, c.step) for c in kvckpt.durable_checkpoints(durable)] == [("final", None)]
    for name in ("step1", "step2", "final"):
        kvckpt.delete(redis_server.url(f"{namespace}/{name}"))
    restorable = kvckpt.newest_restorable(url, durable)
    assert restorable == os.path.join(durable, "final") and loaded_step(restorable) == 3
