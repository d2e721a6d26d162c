"""What dead multi-rank saves leave is counted in saves, not ranks, and nothing of it stays unseen.

Real 2-rank gloo saves (tests/ranks.py) against a real redis-server; a rank ends itself with
os._exit at a chosen point, as a killed or crashed process would.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

import kvckpt
from kvckpt import layout
from kvckpt.management import orphans
from tests.harness.servers import RedisServer
from tests.ranks import run_ranks
from tests.test_cli import kvckpt_cli
from tests.test_orphans import GateOnRank1, generations, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIVE_TTL = 1.0


class ExitOnRank1AtGate(GateOnRank1):
    """Rank 1 ends its process at its second item, once ``gate`` exists (before writing it)."""

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)  # rank 1 waits at the gate on its second item
        if dist.get_rank() == 1 and self.resolved == 2:
            os._exit(3)
        return data


def dies_midway(rank: int, world_size: int, url: str, gate: str) -> None:
    state = {f"r{rank}.w{i}": torch.full((4096,), float(i)) for i in range(3)}
    kvckpt.save(
        state, url, planner=ExitOnRank1AtGate(gate), chunk_bytes=4096, batch_bytes=4096, live_ttl=LIVE_TTL
    )


class ExitingWriter(kvckpt.KVStorageWriter):
    """Ends rank ``who``'s process right after planning (the coordinator, having marked the
    namespace ``.unfinished``) or at the very start of its write_data."""

    def __init__(self, url: str, who: int, where: str) -> None:
        super().__init__(url, live_ttl=LIVE_TTL)
        self.who, self.where = who, where

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        planned = super().prepare_global_plan(plans)
        if self.where == "planned" and dist.get_rank() == self.who:
            os._exit(3)
        return planned

    def write_data(self, plan: SavePlan, planner: Any) -> Any:
        if self.where == "writing" and dist.get_rank() == self.who:
            os._exit(3)
        return super().write_data(plan, planner)


def dies_at_start(rank: int, world_size: int, url: str, who: int, where: str) -> None:
    state = {} if rank == 0 else {"w": torch.ones(1024)}  # rank 0 has nothing to write
    dcp_save(state, storage_writer=ExitingWriter(url, who, where))


def no_save_running(store: kvckpt.KVStore, namespace: str) -> None:
    wait_for(
        lambda: not any(f"/{layout.LIVE_NAME}/" in k for k in store.scan_prefix(f"{namespace}/")),
        "the dead save's liveness marker to lapse",
    )


@pytest.mark.slow
def test_a_dead_two_rank_save_is_one_save(redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    url, gate = redis_server.url(f"{namespace}/step1"), tmp_path / "gate"
    store = kvckpt.open_store(redis_server.url("inspect"))
    backend: Any = type("B", (), {"keys": lambda self, p: list(store.scan_prefix(p))})()

    def open_gate_when_both_ranks_wrote() -> None:
        try:
            ready = lambda: len(generations(backend, f"{namespace}/step1")) == 2  # noqa: E731
            wait_for(ready, "both ranks' data", seconds=120)
        finally:
            gate.touch()

    thread = threading.Thread(target=open_gate_when_both_ranks_wrote)
    thread.start()
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(dies_midway, 2, url, str(gate))
    thread.join()
    no_save_running(store, namespace)

    found = kvckpt.list_orphans(redis_server.url(namespace))
    assert len(found) == 2 and {o.namespace for o in found} == {f"{namespace}/step1"}
    assert orphans.summary(found).startswith("1 save that died left 2 orphaned generations holding ")
    listed = kvckpt_cli("ls", redis_server.url(namespace))
    assert listed.returncode == 0, listed.stderr
    assert "orphans: 1 save that died left 2 orphaned generations holding" in listed.stdout
    missing = kvckpt_cli("info", url)
    assert missing.returncode == 1 and "1 save that died left 2 orphaned generations" in missing.stderr
    removed = kvckpt_cli("gc", redis_server.url(namespace))
    assert removed.returncode == 0, removed.stderr
    assert "removed what 1 save that died left 2 orphaned generations holding" in removed.stdout
    assert list(store.scan_prefix(f"{namespace}/")) == []
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize(("who", "where"), [(0, "planned"), (1, "writing")])
def test_a_save_dead_before_any_data_leaves_nothing_unseen(
    redis_server: RedisServer, namespace: str, who: int, where: str
) -> None:
    """The coordinator marks the namespace ``.unfinished`` before any rank writes; a save that dies
    before any data lands leaves only that marker. It is listed, and gc removes it."""
    url = redis_server.url(f"{namespace}/step1")
    store = kvckpt.open_store(redis_server.url("inspect"))
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(dies_at_start, 2, url, who, where)
    no_save_running(store, namespace)
    assert list(store.scan_prefix(f"{namespace}/")) == [layout.unfinished_key(f"{namespace}/step1")]

    (left,) = kvckpt.list_orphans(redis_server.url(namespace))
    assert left.marker_only and (left.namespace, left.num_keys) == (f"{namespace}/step1", 1)
    listed = kvckpt_cli("ls", redis_server.url(namespace))
    assert (
        "orphans: 1 save that died left 1 .unfinished marker (dead before writing any data)" in listed.stdout
    )
    dry = kvckpt_cli("gc", "--dry-run", redis_server.url(namespace))
    assert (
        f"would remove redis://127.0.0.1:{redis_server.port}/0/{namespace}/step1/.unfinished: " in dry.stdout
    )
    assert kvckpt.gc(redis_server.url(namespace)) == [left]
    assert list(store.scan_prefix(f"{namespace}/")) == []
    kvckpt.save({"w": torch.ones(2)}, url)  # and the namespace saves as ever
    assert kvckpt.list_orphans(redis_server.url(namespace)) == []
    store.close()
