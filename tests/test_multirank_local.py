"""DCP's uncoordinated modes on real ranks: ``use_collectives=False`` (a record per rank) and ``no_dist``."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import kvckpt
from kvckpt import layout, record
from tests.harness.servers import RedisServer
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def own_state(rank: int) -> dict[str, Any]:
    return {"w": torch.arange(6, dtype=torch.float32) + 10 * rank, "meta": {"rank": rank}}


def blank() -> dict[str, Any]:
    return {"w": torch.zeros(6), "meta": {"rank": None}}


def assert_state(state: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    assert torch.equal(state["w"], expected["w"]), where
    assert state["meta"] == expected["meta"], where


def local_scenario(rank: int, world_size: int, port: int, namespace: str) -> None:
    server, raw = RedisServer(port=port), cast(Any, redis.Redis(port=port))

    # use_collectives=False: every rank commits its own record, with its own generation.
    url = server.url(f"{namespace}/local")
    kvckpt.save(own_state(rank), url, use_collectives=False)
    dist.barrier()
    keys = {k.decode() for k in raw.scan_iter(match=f"{namespace}/local/*")}
    records = {k for k in keys if k.endswith(layout.RECORD_NAME)}
    assert records == {layout.record_key(f"{namespace}/local", r) for r in range(world_size)}
    key = layout.record_key(f"{namespace}/local", rank)
    body = record.decode_record(raw.get(key), key)
    assert (body["rank"], body["world_size"]) == (rank, 1)
    assert len({k.split("/")[3] for k in keys - records}) == world_size  # one generation per rank

    # DCP's own loader falls back to the rank's record, and so does kvckpt.load.
    for name, load in (
        ("dcp.load", lambda s: dcp.load(s, storage_reader=kvckpt.KVStorageReader(url))),
        ("kvckpt.load", lambda s: kvckpt.load(s, url)),
    ):
        state = blank()
        load(state)
        assert_state(state, own_state(rank), f"{name} of a rank-local checkpoint")

    with pytest.raises(kvckpt.CheckpointExistsError, match="overwrite=True"):
        kvckpt.save(own_state(rank), url, use_collectives=False)
    kvckpt.save({**own_state(rank), "w": -own_state(rank)["w"]}, url, use_collectives=False, overwrite=True)
    state = blank()
    kvckpt.load(state, url)
    assert torch.equal(state["w"], -own_state(rank)["w"])
    dist.barrier()

    if rank == 0:  # delete finds every rank's record and its data
        assert kvckpt.delete(url) is True
        assert list(raw.scan_iter(match=f"{namespace}/local/*")) == []
    dist.barrier()
    with pytest.raises(kvckpt.CheckpointNotFoundError):
        kvckpt.load(blank(), url)

    # no_dist: one rank saves inside a running job, without the others; all of them load it.
    url = server.url(f"{namespace}/single")
    if rank == 0:
        dcp.save(own_state(0), storage_writer=kvckpt.KVStorageWriter(url), no_dist=True)
        key = layout.record_key(f"{namespace}/single")
        assert record.decode_record(raw.get(key), key)["world_size"] == 1
    dist.barrier()
    for name, load in (
        ("no_dist dcp.load", lambda s: dcp.load(s, storage_reader=kvckpt.KVStorageReader(url), no_dist=True)),
        ("no_dist kvckpt.load", lambda s: kvckpt.load(s, url, no_dist=True)),
        ("collective kvckpt.load", lambda s: kvckpt.load(s, url)),
    ):
        state = blank()
        load(state)
        assert_state(state, own_state(0), name)
    raw.close()


def test_rank_local_records_and_no_dist(redis_server: RedisServer, namespace: str) -> None:
    run_ranks(local_scenario, 2, redis_server.port, namespace)
