"""``async_save`` in one process: the thread executor, with and without a stager.

Mirrors upstream ``e2e/test_e2e_save_and_load.py::test_e2e_async_cached`` (async_save with a
``DefaultStager`` built from ``StagingOptions``, returning a Future or, with asynchronous staging, an
``AsyncSaveResponse``), ``test_state_dict_stager.py`` (what is saved is the state at the call, however
the tensors change afterwards) and ``test_async_process_executor.py``'s
``test_checkpoint_save_failure_continues_serving`` (a failed save surfaces through its future and
the next one succeeds). The process executor needs a process group (it starts its own upload process
joined to it), so it runs with real ranks in test_ranks.py. ``cache_staged_state_dict`` belongs to
FileSystemWriter's own stager; any writer gets the same effect from ``DefaultStager``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

from tests.dcp_semantics.compare import assert_same, upload_of
from tests.dcp_semantics.places import Place
from tests.helpers import random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STAGERS = {
    "no stager": None,
    "blocking stager": StagingOptions(False, False, False, False),
    "background stager in shared memory": StagingOptions(
        use_pinned_memory=False, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=False
    ),
}


@pytest.mark.parametrize("staging", list(STAGERS))
def test_async_save_holds_the_state_of_the_call(places: list[Place], staging: str) -> None:
    options = STAGERS[staging]
    stager = None if options is None else DefaultStager(options)
    try:
        for place in places:
            weight = random_tensor((64, 8), torch.float32, 1)
            state: dict[str, Any] = {"w": weight, "step": 5, "nested": {"b": torch.arange(7)}}
            expected = {"w": weight.clone(), "step": 5, "nested": {"b": torch.arange(7)}}
            response = async_save(
                state, storage_writer=place.writer("async"), async_stager=stager, no_dist=True
            )
            if stager is not None and options is not None and options.use_async_staging:
                assert isinstance(response, AsyncSaveResponse), place.name
            upload = upload_of(response)
            weight.add_(1)  # training goes on once staging is done
            state["nested"]["b"].zero_()
            upload.result(timeout=60)

            target: dict[str, Any] = {
                "w": torch.zeros(64, 8),
                "step": 0,
                "nested": {"b": torch.zeros(7, dtype=torch.int64)},
            }
            load(target, storage_reader=place.reader("async"), no_dist=True)
            assert_same(target, expected, f"{place.name}, {staging}")
    finally:
        if stager is not None:
            stager.close()


def test_failed_async_save_surfaces_and_the_next_one_succeeds(places: list[Place]) -> None:
    for place in places:
        upload_of(
            async_save({"w": torch.ones(3)}, storage_writer=place.writer("taken"), no_dist=True)
        ).result(60)
        refused = upload_of(
            async_save({"w": torch.zeros(3)}, storage_writer=place.writer("taken"), no_dist=True)
        )
        with pytest.raises(CheckpointException):
            refused.result(timeout=60)
        writer = place.writer("taken", overwrite=True)
        upload_of(async_save({"w": torch.full((3,), 2.0)}, storage_writer=writer, no_dist=True)).result(60)
        target = {"w": torch.zeros(3)}
        load(target, storage_reader=place.reader("taken"), no_dist=True)
        assert_same(target, {"w": torch.full((3,), 2.0)}, place.name)


def test_async_save_points_an_unaddressed_writer_at_its_checkpoint_id(places: list[Place]) -> None:
    """``async_save(checkpoint_id=..., storage_writer=writer)``: DCP resets the writer to the id in
    the upload thread, as ``save`` does; one writer serves successive async saves."""
    for place in places:
        writer = place.writer()
        for step in range(3):
            state = {"w": torch.full((4,), float(step))}
            upload_of(
                async_save(state, checkpoint_id=place.id(f"a{step}"), storage_writer=writer, no_dist=True)
            ).result(60)
        for step in range(3):
            target = {"w": torch.zeros(4)}
            load(target, storage_reader=place.reader(f"a{step}"), no_dist=True)
            assert_same(target, {"w": torch.full((4,), float(step))}, f"{place.name}: a{step}")
