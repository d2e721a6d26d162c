"""Many ranks on one redis-server: parallel writes, one record fetch per reader, range reads.

The server is private to the test so its own counters (INFO stats, commandstats) count exactly what
the ranks sent and fetched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

import kvckpt
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ROWS, COLS = 1000, 1000  # fp32 rows of 4000 bytes: never aligned to the 4 KiB checksum blocks
FULL = random_tensor((ROWS, COLS), torch.float32, seed=7)
NEEDED = FULL.numel() * FULL.element_size()  # every load below needs each element once in all
OPTIONS: dict[str, Any] = {"chunk_bytes": 256 << 10, "block_bytes": 4 << 10}


class WaitForPeers(DefaultSavePlanner):
    """Holds this rank's first write until every other rank's shard is in the store.

    If one rank's writes waited for another's, the peers' keys would never appear and this fails.
    """

    def __init__(self, port: int, namespace: str, peer_markers: list[str]) -> None:
        super().__init__()
        self.port, self.namespace, self.peer_markers = port, namespace, peer_markers
        self.waited = False

    def resolve_data(self, write_item: Any) -> Any:
        if not self.waited:
            raw = redis.Redis(port=self.port)
            deadline = time.monotonic() + 60
            while True:
                keys = [k.decode() for k in raw.scan_iter(match=f"{self.namespace}/*")]
                if all(any(marker in key for key in keys) for marker in self.peer_markers):
                    break
                assert time.monotonic() < deadline, "the other ranks' writes waited for this rank's"
                time.sleep(0.02)
            raw.close()
            self.waited = True
        return super().resolve_data(write_item)


def counted(rank: int, raw: redis.Redis, action: Callable[[], None]) -> dict[str, Any]:
    """Run ``action`` on every rank; rank 0 returns the server's stats for exactly that span."""
    if rank == 0:
        raw.config_resetstat()
    dist.barrier()
    action()
    dist.barrier()
    return {**raw.info("stats"), **raw.info("commandstats")} if rank == 0 else {}


def server_scenario(rank: int, world_size: int, port: int) -> None:
    server, raw = RedisServer(port=port), redis.Redis(port=port)
    meshes = {n: DeviceMesh("cpu", list(range(n))) for n in (1, 2, 3, 4)}
    grid = DeviceMesh("cpu", [[0, 1], [2, 3]])

    # Writes: rank 0 holds its own until ranks 1-3 have stored theirs.
    peers = [f"/w/{r * ROWS // world_size},0/" for r in range(1, world_size)]
    planner = WaitForPeers(port, "on4", peers) if rank == 0 else None
    kvckpt.save(
        {"w": distribute_tensor(FULL, meshes[4], [Shard(0)])}, server.url("on4"), planner=planner, **OPTIONS
    )
    if rank == 0:
        kvckpt.save({"w": FULL}, server.url("on1"), no_dist=True, **OPTIONS)
    dist.barrier()

    def load(name: str, mesh: DeviceMesh, placements: list[Any]) -> Callable[[], None]:
        def action() -> None:
            if mesh.get_coordinate() is None:
                return
            state = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, placements)}
            group = mesh.get_group() if mesh.ndim == 1 else None
            kvckpt.load(state, server.url(name), process_group=group)
            expected = distribute_tensor(FULL, mesh, placements).to_local()
            assert bits_equal(state["w"].to_local(), expected), (name, mesh)

        return action

    for m in (4, 3, 2):
        stats = counted(rank, raw, load("on4", meshes[m], [Shard(0)]))
        if rank == 0:
            # The record once per reader (GET); tensor bytes only through range reads (GETRANGE).
            assert stats["cmdstat_get"]["calls"] == m, stats["cmdstat_get"]
            ratio = stats["total_net_output_bytes"] / NEEDED
            assert 1.0 <= ratio <= 1.1, f"4 -> {m} ranks read {ratio:.3f}x the bytes they needed"

    # A 2x2 grid box is not contiguous: each rank reads the whole rows holding it (half the tensor,
    # twice what it needs), not the whole stored tensor (four times).
    stats = counted(rank, raw, load("on1", grid, [Shard(0), Shard(1)]))
    if rank == 0:
        ratio = stats["total_net_output_bytes"] / NEEDED
        assert 2.0 <= ratio <= 2.1, f"1 rank -> 2x2 grid read {ratio:.3f}x the bytes it needed"
    raw.close()


def test_many_ranks_on_one_server() -> None:
    with RedisServer() as server:
        run_ranks(server_scenario, 4, server.port)
