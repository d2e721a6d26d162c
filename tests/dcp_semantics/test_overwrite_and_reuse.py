"""Overwriting, reusing one writer/reader for many checkpoints, and how DCP finds a storage.

Mirrors upstream ``test_fsspec.py::test_overwrite`` and ``e2e/test_e2e_save_and_load.py``'s
``TestCheckpointOrderingAndOverwrite.test_overwrite`` (a save with ``overwrite=True`` replaces the
checkpoint; one with ``overwrite=False`` is refused and changes nothing), the deprecated
``save_state_dict``/``load_state_dict`` entry points ``test_checkpoint.py`` still drives (they call
``reset()`` with no id), and ``test_save_load_api.py::test_auto_detect``: given only a
``checkpoint_id``, DCP picks FileSystemWriter or FsspecWriter and refuses anything else with
"Cannot detect"; after ``kvckpt.install()`` it also picks kvckpt for kvckpt's URLs. Given a writer
or reader, DCP points it at each ``checkpoint_id`` through ``reset``: the reuse training loops do.

One default differs on purpose: FileSystemWriter overwrites unless told not to, a KVStorageWriter
refuses unless told to (a committed checkpoint is never replaced by accident), so every save here
says which it wants.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys, load, load_state_dict
from torch.distributed.checkpoint.state_dict_saver import save, save_state_dict

import kvckpt
from kvckpt.errors import CheckpointExistsError
from tests.conftest import Backend
from tests.dcp_semantics.compare import rank_failure
from tests.dcp_semantics.places import Place
from tests.helpers import bits_equal, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def states(count: int) -> list[dict[str, torch.Tensor]]:
    """Same keys and shapes, different bits: what successive steps of one run look like."""
    return [
        {"w": random_tensor((10,), torch.float32, seed), "b": torch.full((3,), seed)} for seed in range(count)
    ]


def loaded(place: Place, checkpoint: str) -> torch.Tensor:
    target = {"w": torch.zeros(10)}
    load(target, storage_reader=place.reader(checkpoint), no_dist=True)
    return target["w"]


def test_overwrite_replaces_and_a_refused_save_changes_nothing(places: list[Place]) -> None:
    t1, t2, t3 = (random_tensor((10,), torch.float32, seed) for seed in (1, 2, 3))
    for place in places:
        save({"w": t1}, storage_writer=place.writer("over", overwrite=False), no_dist=True)
        save({"w": t2}, storage_writer=place.writer("over", overwrite=True), no_dist=True)
        assert bits_equal(loaded(place, "over"), t2), place.name
        with pytest.raises(CheckpointException) as refused:
            save({"w": t3}, storage_writer=place.writer("over", overwrite=False), no_dist=True)
        failure = rank_failure(refused.value)
        assert isinstance(failure, RuntimeError if place.is_folder else CheckpointExistsError), failure
        assert bits_equal(loaded(place, "over"), t2), place.name


def test_refusal_says_checkpoint_already_exists(places: list[Place]) -> None:
    """Code written for DCP matches the refusal on "Checkpoint already exists" (upstream asserts
    ``assertRaisesRegex(CheckpointException, ".*Checkpoint already exists.*")``)."""
    for place in places:
        save({"w": torch.ones(2)}, storage_writer=place.writer("words", overwrite=True), no_dist=True)
        with pytest.raises(CheckpointException, match="Checkpoint already exists"):
            save({"w": torch.ones(2)}, storage_writer=place.writer("words"), no_dist=True)


def test_one_writer_and_one_reader_across_checkpoint_ids(places: list[Place]) -> None:
    """DCP calls ``reset(checkpoint_id)`` on the objects it is given; saves and loads interleave."""
    steps = states(4)
    for place in places:
        writer, reader = place.writer(), place.reader()
        for i, state in enumerate(steps):
            save(state, checkpoint_id=place.id(f"step{i}"), storage_writer=writer, no_dist=True)
            target = {"w": torch.zeros(10), "b": torch.zeros(3, dtype=torch.int64)}
            load(target, checkpoint_id=place.id(f"step{i}"), storage_reader=reader, no_dist=True)
            assert bits_equal(target["w"], state["w"]) and bits_equal(target["b"], state["b"]), place.name
        for i in (2, 0, 3, 1):
            target = {"w": torch.zeros(10), "b": torch.zeros(3, dtype=torch.int64)}
            load(target, checkpoint_id=place.id(f"step{i}"), storage_reader=reader, no_dist=True)
            assert bits_equal(target["w"], steps[i]["w"]), f"{place.name}: step{i}"


def test_one_id_overwritten_again_and_again_by_one_writer(places: list[Place]) -> None:
    """Without a checkpoint_id DCP does not reset the objects: the same writer and reader serve
    every save and load of one id, and each load sees the latest save."""
    for place in places:
        writer, reader = place.writer("latest", overwrite=True), place.reader("latest")
        for state in states(4):
            save(state, storage_writer=writer, no_dist=True)
            target = {"w": torch.zeros(10)}
            load(target, storage_reader=reader, no_dist=True)
            assert bits_equal(target["w"], state["w"]), place.name
        assert bits_equal(loaded(place, "latest"), states(4)[-1]["w"]), place.name


def test_deprecated_entry_points_reset_without_an_id(places: list[Place]) -> None:
    state = states(1)[0]
    for place in places:
        save_state_dict(state, storage_writer=place.writer("old-api"), no_dist=True)
        target = {"w": torch.zeros(10), "b": torch.zeros(3, dtype=torch.int64)}
        load_state_dict(target, storage_reader=place.reader("old-api"), no_dist=True)
        assert bits_equal(target["w"], state["w"]), place.name


def test_storage_detected_from_a_url_after_install(url_backend: Backend, namespace: str) -> None:
    """DCP alone detects only folders and fsspec URLs; ``kvckpt.install()`` adds kvckpt's schemes.
    Any other scheme is still DCP's "Cannot detect"."""
    kvckpt.install()
    url = url_backend.id(f"{namespace}/detected")
    state: dict[str, Any] = {
        "w": random_tensor((5,), torch.float32, 4),
        "step": 3,
        "epoch": io.BytesIO(b"epoch:4"),
    }
    save(state, checkpoint_id=url, no_dist=True)
    target: dict[str, Any] = {"w": torch.zeros(5), "step": 0, "epoch": io.BytesIO()}
    load(target, checkpoint_id=url, no_dist=True)
    assert bits_equal(target["w"], state["w"]) and target["step"] == 3
    assert target["epoch"].getvalue() == b"epoch:4"
    assert bits_equal(_load_state_dict_from_keys("w", checkpoint_id=url)["w"], state["w"])
    for call in (save, load):
        with pytest.raises(RuntimeError, match="Cannot detect"):
            call({"w": torch.ones(2)}, checkpoint_id="abc://abc.abc", no_dist=True)
