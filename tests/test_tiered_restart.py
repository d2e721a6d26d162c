"""Restart across tiers: 4 FSDP2 ranks save to Redis, the drainer copies to a folder, the store is
flushed, and 2 ranks resume from what ``newest_restorable`` answers, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

import kvckpt
from tests.harness.servers import RedisServer
from tests.ranks import run_ranks
from tests.test_multirank_training import assert_same, build, full_state, train_step

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

DRAINED_AT = 3


def train_scenario(rank: int, world_size: int, prefix: str, reference: str) -> None:
    model, optim = build(seed=0)
    for step in range(DRAINED_AT):
        train_step(model, optim, step)
        if step + 1 >= DRAINED_AT - 1:  # two checkpoints in the store; the drainer takes the newest
            model_state, optim_state = get_state_dict(model, optim)
            state = {"model": model_state, "optim": optim_state, "trainer": {"step": step + 1}}
            kvckpt.save(state, f"{prefix}/step{step + 1}")
    model_full, optim_full = full_state(model, optim)
    loss = train_step(model, optim, DRAINED_AT)
    if rank == 0:  # test-side scratch file, not a kvckpt format
        torch.save({"loss": loss, "model": model_full, "optim": optim_full}, reference)


def resume_scenario(rank: int, world_size: int, checkpoint_id: str, reference: str) -> None:
    expected = torch.load(reference)
    for how in ("kvckpt.load", "stock FileSystemReader"):
        model, optim = build(seed=1)  # other weights: only the checkpoint can make the runs agree
        model_state, optim_state = get_state_dict(model, optim)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state, "trainer": {"step": None}}
        if how == "kvckpt.load":
            kvckpt.load(state, checkpoint_id)
        else:
            dcp_load(state, storage_reader=FileSystemReader(checkpoint_id))
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert state["trainer"]["step"] == DRAINED_AT, how
        model_full, optim_full = full_state(model, optim)
        loss = train_step(model, optim, DRAINED_AT)
        if rank == 0:
            assert_same(model_full, expected["model"], f"{how}: model")
            assert_same(optim_full, expected["optim"], f"{how}: optim")
            assert loss == expected["loss"], how  # the forward reads only restored weights


def test_after_flushall_resume_on_2_ranks_from_the_drained_copy_of_a_4_rank_save(
    tmp_path: Path, namespace: str
) -> None:
    durable, reference = tmp_path / "durable", str(tmp_path / "reference.pt")
    with RedisServer() as server:  # its own server: FLUSHALL must not reach other tests' keys
        prefix = server.url(namespace)
        run_ranks(train_scenario, 4, prefix, reference)
        assert kvckpt.Drainer(prefix, durable).run(once=True) == 0
        assert kvckpt.newest_restorable(prefix, durable) == server.url(f"{namespace}/step{DRAINED_AT}")
        redis.Redis(port=server.port).flushall()
        assert kvckpt.list_checkpoints(prefix) == []
        restorable = kvckpt.newest_restorable(prefix, durable)
    assert restorable == str(durable / f"step{DRAINED_AT}")
    run_ranks(resume_scenario, 2, restorable, reference)
