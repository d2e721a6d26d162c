"""DCP plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) against the commit protocol.

With caching on, a save whose local plans equal the cached ones gets DCP's cached *final* plan back,
``storage_data`` from the first save included, and on ranks other than the coordinator the storage
writer's ``prepare_global_plan`` never runs. Megatron-Core's and NeMo's planners turn caching on. Every
save must still land in a fresh generation, so a failed overwrite leaves the committed checkpoint whole.
The cache is class-level, keyed by the planner's class name: one class here, cleared around each test.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

import kvckpt
from kvckpt.testing.fake_server import TcpServer
from tests.conftest import Backend
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor
from tests.ranks import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHUNK = 64 << 10  # small chunks: several data keys per tensor, as a large checkpoint has
#: Writer settings that send each chunk as soon as it is cut, as a checkpoint of many GiB does.
SMALL: dict[str, Any] = {"chunk_bytes": CHUNK, "batch_bytes": CHUNK}


class CachingPlanner(DefaultSavePlanner):
    """Plan caching on, as Megatron-Core's planner has it; optionally fails resolving one fqn."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__(enable_plan_caching=True)
        self.fail_on = fail_on

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.index.fqn == self.fail_on:
            raise RuntimeError(f"injected failure resolving {self.fail_on}")
        return super().resolve_data(write_item)


def clear_plan_cache() -> None:
    key = CachingPlanner.__name__
    for cache in (
        SavePlanner._cached_save_plan,
        SavePlanner._cached_all_plans,
        SavePlanner._cached_global_plan,
        SavePlanner._cached_metadata,
        SavePlanner._cached_final_save_plan,
    ):
        cache.pop(key, None)


@pytest.fixture(autouse=True)
def fresh_plan_cache() -> Iterator[None]:
    clear_plan_cache()
    yield
    clear_plan_cache()


def state_at(step: int) -> dict[str, Any]:
    """The same shapes every step (so DCP serves the cached plan), different values."""
    return {
        "a": random_tensor((256, 256), torch.float32, seed=10 * step + 1),  # 256 KiB: 4 chunks
        "b": random_tensor((300,), torch.bfloat16, seed=10 * step + 2),
        "step": step,
    }


def loaded(backend: Backend, namespace: str) -> dict[str, Any]:
    target = {"a": torch.zeros(256, 256), "b": torch.zeros(300, dtype=torch.bfloat16), "step": None}
    kvckpt.load(target, backend.id(namespace), **backend.options)
    return target


def assert_holds(backend: Backend, namespace: str, step: int) -> None:
    expected, got = state_at(step), loaded(backend, namespace)
    assert bits_equal(got["a"], expected["a"]) and bits_equal(got["b"], expected["b"])
    assert got["step"] == step


def cached_save(backend: Backend, namespace: str, step: int, **writer: Any) -> None:
    dcp.save(
        state_at(step),
        storage_writer=kvckpt.KVStorageWriter(backend.id(namespace), **SMALL, **backend.options, **writer),
        planner=CachingPlanner(),
    )


def test_failed_overwrite_under_plan_caching_keeps_the_committed_checkpoint(
    backend: Backend, namespace: str
) -> None:
    cached_save(backend, namespace, 0, overwrite=True)
    committed = backend.keys(namespace)
    with pytest.raises(BaseException, match="injected failure"):
        dcp.save(
            state_at(1),
            storage_writer=kvckpt.KVStorageWriter(
                backend.id(namespace), **SMALL, overwrite=True, **backend.options
            ),
            planner=CachingPlanner(fail_on="b"),
        )
    assert backend.keys(namespace) == committed  # nothing of the failed save left, nothing lost
    assert_holds(backend, namespace, 0)


def test_successive_and_overwritten_checkpoints_under_plan_caching(backend: Backend, namespace: str) -> None:
    for step in range(3):  # step0..step2, one writer object each, as a training loop makes them
        cached_save(backend, f"{namespace}/step{step}", step)
    for step in range(3):
        assert_holds(backend, f"{namespace}/step{step}", step)

    writer = kvckpt.KVStorageWriter(**SMALL, overwrite=True, **backend.options)
    generations = set()
    for step in range(3):  # one id overwritten again and again, by one reused writer object
        dcp.save(
            state_at(step),
            checkpoint_id=backend.id(f"{namespace}/same"),
            storage_writer=writer,
            planner=CachingPlanner(),
        )
        assert_holds(backend, f"{namespace}/same", step)
        generations.add(kvckpt.info(backend.id(f"{namespace}/same"), **backend.options).save_id)
        data = [k.removeprefix(f"{namespace}/same/") for k in backend.keys(f"{namespace}/same/")]
        assert {k.split("/")[0] for k in data if not k.endswith(".metadata")} == {
            kvckpt.info(backend.id(f"{namespace}/same"), **backend.options).save_id
        }
    assert len(generations) == 3


def test_each_cached_save_records_its_own_id_and_dcp_version(backend: Backend, namespace: str) -> None:
    """DCP hands every cached save the same Metadata object: a record must still name its own
    checkpoint, and the writer must leave DCP's object as it was."""
    for step in range(3):
        cached_save(backend, f"{namespace}/step{step}", step)
    cached = SavePlanner._cached_metadata[CachingPlanner.__name__]
    assert cached.storage_data is None and cached.version is None  # never written into
    for step in range(3):
        reader = kvckpt.KVStorageReader(backend.id(f"{namespace}/step{step}"), **backend.options)
        metadata = reader.read_metadata()
        assert metadata.storage_meta is not None
        assert str(metadata.storage_meta.checkpoint_id).endswith(f"{namespace}/step{step}")
        assert (
            metadata.storage_meta.save_id
            == kvckpt.info(backend.id(f"{namespace}/step{step}"), **backend.options).save_id
        )
        assert metadata.version == CURRENT_DCP_VERSION  # as FileSystemWriter records it


# Two real ranks: the non-coordinator never runs prepare_global_plan on a cached save --------------


def sharded(step: int, mesh: DeviceMesh) -> dict[str, Any]:
    full = state_at(step)
    return {"a": distribute_tensor(full["a"], mesh, [Shard(0)]), "b": full["b"], "step": step}


def ranks_scenario(rank: int, world_size: int, url: str, only_async: bool) -> None:
    mesh = DeviceMesh("cpu", list(range(world_size)))
    clear_plan_cache()
    last = world_size - 1  # the rank that fails: never the coordinator when there are two

    def writer(namespace: str, **options: Any) -> kvckpt.KVStorageWriter:
        return kvckpt.KVStorageWriter(f"{url}/{namespace}", **SMALL, **options)

    def check(step: int, namespace: str) -> None:
        full = state_at(step)
        target: dict[str, Any] = {
            "a": distribute_tensor(torch.zeros(256, 256), mesh, [Shard(0)]),
            "b": torch.zeros(300, dtype=torch.bfloat16),
            "step": None,
        }
        kvckpt.load(target, f"{url}/{namespace}")
        expected_a = distribute_tensor(full["a"], mesh, [Shard(0)]).to_local()
        assert bits_equal(target["a"].to_local(), expected_a), (namespace, step)
        assert bits_equal(target["b"], full["b"]) and target["step"] == step, (namespace, step)

    if not only_async:
        for step in range(3):
            dcp.save(sharded(step, mesh), storage_writer=writer(f"step{step}"), planner=CachingPlanner())
        for step in range(3):
            check(step, f"step{step}")
        for step in range(3):
            dcp.save(
                sharded(step, mesh), storage_writer=writer("same", overwrite=True), planner=CachingPlanner()
            )
            check(step, "same")
        # the last rank fails resolving its shard of a: the committed step 2 must survive it
        with pytest.raises(BaseException, match="injected failure"):
            dcp.save(
                sharded(3, mesh),
                storage_writer=writer("same", overwrite=True),
                planner=CachingPlanner(fail_on="a" if rank == last else None),
            )
        dist.barrier()
        check(2, "same")

    for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
        for step in range(2):
            future = dcp.async_save(
                sharded(step, mesh),
                storage_writer=writer(f"async-{kind.value}", overwrite=True),
                planner=CachingPlanner(),
                async_checkpointer_type=kind,
            )
            assert isinstance(future, concurrent.futures.Future)
            future.result(timeout=120)
            dist.barrier()
            check(step, f"async-{kind.value}")


@pytest.fixture(scope="module")
def fakeredis_tcp() -> Iterator[TcpServer]:
    """fakeredis serving TCP: the ranks are separate processes, so they need one server to share."""
    with TcpServer() as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("store", ["redis", "etcd", "fakeredis"])
def test_two_ranks_under_plan_caching(store: str, request: pytest.FixtureRequest, namespace: str) -> None:
    if store == "redis":
        url = request.getfixturevalue("redis_server").url(namespace)
    elif store == "etcd":
        url = request.getfixturevalue("etcd_server").url(namespace)
    else:
        url = request.getfixturevalue("fakeredis_tcp").url(namespace)
    run_ranks(ranks_scenario, 2, url, False)


@pytest.mark.slow
def test_async_save_single_process_under_plan_caching(redis_server: RedisServer, namespace: str) -> None:
    run_ranks(ranks_scenario, 1, redis_server.url(namespace), True)


def test_plan_caching_leaves_no_uncommitted_keys_after_success(backend: Backend, namespace: str) -> None:
    cached_save(backend, namespace, 0, overwrite=True)
    cached_save(backend, namespace, 1, overwrite=True)
    info = kvckpt.info(backend.id(namespace), **backend.options)
    data = [k for k in backend.keys(f"{namespace}/") if not k.endswith(".metadata")]
    assert len(data) == info.num_keys  # the replaced generation is gone, the new one complete
    assert_holds(backend, namespace, 1)


def test_reused_reader_sees_an_overwrite_between_loads(backend: Backend, namespace: str) -> None:
    """DCP calls read_metadata at the start of every load; a reader kept by the caller must not
    answer it from a record it fetched before an overwrite (its data is then gone)."""
    cached_save(backend, namespace, 0, overwrite=True)
    reader = kvckpt.KVStorageReader(backend.id(namespace), **backend.options)
    assert "a" in reader.read_metadata().state_dict_metadata  # the caller looks before loading
    cached_save(backend, namespace, 1, overwrite=True)
    for _ in range(2):  # and the same reader keeps working for later loads
        target: dict[str, Any] = {
            "a": torch.zeros(256, 256),
            "b": torch.zeros(300, dtype=torch.bfloat16),
            "step": None,
        }
        dcp.load(target, storage_reader=reader)
        assert bits_equal(target["a"], state_at(1)["a"]) and target["step"] == 1
