"""``dcp.async_save`` with KVStorageWriter: thread and process executors, on 2 real ranks.

The upload is held at a gate (a file) while training keeps stepping and running collectives; the
checkpoint must stay invisible until its record is committed, then hold the values of the moment
``async_save`` was called. The process executor pickles writer and planner into another process,
so this also proves stores connect lazily there.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

import kvckpt
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


class GatedPlanner(DefaultSavePlanner):
    """Writes nothing until ``gate`` exists; picklable, so it crosses into the upload process."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate

    def resolve_data(self, write_item: Any) -> Any:
        deadline = time.monotonic() + 60
        while not Path(self.gate).exists():
            assert time.monotonic() < deadline, f"the test never opened {self.gate}"
            time.sleep(0.02)
        return super().resolve_data(write_item)


def async_scenario(rank: int, world_size: int, port: int, namespace: str, gates: str) -> None:
    server = RedisServer(port=port)
    checkpoint_group = dist.new_group(backend="gloo")  # uploads must not share the training group
    mesh = DeviceMesh("cpu", list(range(world_size)))
    full = random_tensor((64, 32), torch.float32, seed=11)
    weight = distribute_tensor(full, mesh, [Shard(0)])

    for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
        url, gate = server.url(f"{namespace}/{kind.value}"), Path(gates) / kind.value
        at_save = weight.to_local().clone()
        future = dcp.async_save(
            {"w": weight, "step": 5},
            storage_writer=kvckpt.KVStorageWriter(url),
            planner=GatedPlanner(str(gate)),
            process_group=checkpoint_group,
            async_checkpointer_type=kind,
        )
        for _ in range(3):  # training goes on: updates and collectives while the upload waits
            weight.to_local().add_(1.0)
            dist.all_reduce(torch.ones(1))
        with pytest.raises(kvckpt.CheckpointNotFoundError):
            kvckpt.KVStorageReader(url).read_metadata()
        dist.barrier()
        if rank == 0:
            gate.touch()
        assert isinstance(future, Future)
        future.result(timeout=120)
        dist.barrier()

        state: dict[str, Any] = {
            "w": distribute_tensor(torch.zeros_like(full), mesh, [Shard(0)]),
            "step": None,
        }
        kvckpt.load(state, url)
        assert bits_equal(state["w"].to_local(), at_save), kind
        assert not bits_equal(weight.to_local(), at_save)
        assert state["step"] == 5


def test_async_save_thread_and_process(redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    run_ranks(async_scenario, 2, redis_server.port, namespace, str(tmp_path))
