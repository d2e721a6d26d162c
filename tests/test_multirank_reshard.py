"""Elastic restart: DTensor state dicts saved on N ranks load on M ranks, bit for bit.

One 4-process gloo job holds device meshes over its first 1, 2, 3 and 4 ranks, saves a checkpoint
from each mesh and loads every checkpoint on every mesh, with other placements than it was saved with.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import kvckpt
from kvckpt import layout, record
from kvckpt.registry import open_store
from tests.harness.servers import EtcdServer, RedisServer
from tests.helpers import bits_equal, random_tensor
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

#: fqn → (global tensor, placement when saved, placement when loaded)
TENSORS: dict[str, tuple[torch.Tensor, Placement, Placement]] = {
    "rows": (random_tensor((10, 6), torch.float32, seed=1), Shard(0), Shard(0)),
    "few_rows": (random_tensor((3, 5), torch.float32, seed=2), Shard(0), Shard(1)),  # empty shard on 4
    "cols_bf16": (random_tensor((6, 10), torch.bfloat16, seed=3), Shard(1), Shard(0)),
    "replicated": (random_tensor((7, 3), torch.float64, seed=4), Replicate(), Shard(0)),
    "to_replicated": (random_tensor((9, 7), torch.int32, seed=5), Shard(0), Replicate()),
    "chunked_bf16": (random_tensor((64, 33), torch.bfloat16, seed=6), Shard(0), Shard(0)),
}
PLAIN = {"step": 12, "lr": 3e-4, "name": "run-ü", "sched": {"milestones": [3, 6], "gamma": 0.5}}


def blank_plain() -> dict[str, Any]:
    """A fresh load target for PLAIN (DCP fills it in place, and needs its nested keys)."""
    return {"step": None, "lr": None, "name": None, "sched": {"milestones": None, "gamma": None}}


#: Small chunks and checksum blocks, so shards straddle both and reads are partial ranges.
WRITER_OPTIONS: dict[str, Any] = {"chunk_bytes": 1024, "block_bytes": 256}


GRID = (Shard(0), Shard(1))  # on a 2x2 mesh a rank's box is a block of rows and columns


def placements_of(mesh: DeviceMesh, which: int) -> dict[str, tuple[Placement, ...]]:
    if mesh.ndim == 2:
        return {fqn: GRID for fqn in TENSORS}
    return {fqn: (spec[which],) for fqn, (_, *spec) in TENSORS.items()}


def sharded(mesh: DeviceMesh, which: int, fill: bool) -> dict[str, Any]:
    """The state on ``mesh`` with the save (which=0) or load (which=1) placements; zeros unless fill."""
    state: dict[str, Any] = {}
    for fqn, placements in placements_of(mesh, which).items():
        full = TENSORS[fqn][0]
        state[fqn] = distribute_tensor(full if fill else torch.zeros_like(full), mesh, placements)
    state["plain"] = PLAIN if fill else blank_plain()
    return state


def assert_loaded(state: dict[str, Any], mesh: DeviceMesh | None, where: str) -> None:
    placements = {} if mesh is None else placements_of(mesh, 1)
    for fqn, (full, _, _) in TENSORS.items():
        value = state[fqn]
        if mesh is None:
            assert bits_equal(value, full), f"{where}: {fqn}"
            continue
        assert isinstance(value, DTensor) and value.placements == placements[fqn], f"{where}: {fqn}"
        expected = distribute_tensor(full, mesh, placements[fqn]).to_local()
        assert bits_equal(value.to_local(), expected), f"{where}: {fqn}"
    assert state["plain"] == PLAIN, where


def reshard_scenario(rank: int, world_size: int, url_template: str, namespace: str) -> None:
    meshes = {n: DeviceMesh("cpu", list(range(n))) for n in range(1, world_size + 1)}
    for n, mesh in meshes.items():
        if rank < n:
            kvckpt.save(
                sharded(mesh, 0, fill=True),
                url_template.format(f"{namespace}/n{n}"),
                process_group=mesh.get_group(),
                **WRITER_OPTIONS,
            )
    dist.barrier()

    raw = open_store(url_template.format("inspect"))
    if rank == 0:  # one record per save, naming every shard each rank wrote
        for n in meshes:
            key = layout.record_key(f"{namespace}/n{n}")
            body = record.decode_record(raw.get(key) or b"", key)
            assert body["world_size"] == n
            rows = {tuple(row[1]) for row in body["items"] if row[0] == "rows"}
            expected = {(o, 0) for o in range(0, 10, -(-10 // n))}
            assert rows == expected, (n, rows)
            # The shards are smaller than chunk_bytes: packed, so resharding reads parts of packs.
            assert any(len(chunk) == 4 for row in body["items"] for chunk in row[5]), n
    raw.close()

    loads = [(f"{m} ranks", mesh) for m, mesh in meshes.items()]
    loads.append(("a 2x2 mesh", DeviceMesh("cpu", [[0, 1], [2, 3]])))
    for n in meshes:
        url = url_template.format(f"{namespace}/n{n}")
        for name, mesh in loads:
            if mesh.get_coordinate() is not None:
                state = sharded(mesh, 1, fill=False)
                kvckpt.load(state, url, process_group=mesh.get_group() if mesh.ndim == 1 else None)
                assert_loaded(state, mesh, f"saved on {n} ranks, loaded on {name}")
        if rank == 0:  # a single process without a process group restarts from it too
            state = {fqn: torch.zeros_like(full) for fqn, (full, _, _) in TENSORS.items()}
            state["plain"] = blank_plain()
            kvckpt.load(state, url, no_dist=True)
            assert_loaded(state, None, f"saved on {n} ranks, loaded without a process group")


@pytest.mark.parametrize("backend_name", ["redis", "etcd"])
def test_save_on_n_ranks_load_on_m(request: pytest.FixtureRequest, backend_name: str, namespace: str) -> None:
    server: RedisServer | EtcdServer = request.getfixturevalue(f"{backend_name}_server")
    run_ranks(reshard_scenario, 4, server.url("{}"), namespace)
