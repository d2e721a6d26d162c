"""DCP entry points and options on 2 real gloo ranks: ShardedTensor, FSDP1's sharded optimizer state,
coordinator rank, ``use_collectives=False``, ``no_dist``, ``async_save`` on both executors, reused
writers/readers.

Mirrors upstream ``test_file_system_checkpoint_cpu.py`` (ShardedTensor with chunk and enumerable
sharding specs saved under one spec and loaded under another, rows to columns, sharded to plain and
back; ``[1]``/``"string"`` values on ranks), ``test_checkpoint.py`` (``coordinator_rank=1`` through
the deprecated ``save_state_dict``/``load_state_dict``), ``e2e/test_e2e_save_and_load.py``
(``async_save`` with ``AsyncCheckpointerType.THREAD`` and ``PROCESS`` and a ``DefaultStager`` in
shared memory; state dict keys in a different order on each rank; the overwrite refusal seen by
every rank), ``test_async_process_executor.py`` (a failed save in the upload process surfaces and
the process serves the next one), ``e2e/test_pipeline.py`` (pipeline stages saving disjoint keys
into one checkpoint, loaded by an FSDP model), ``test_fsdp_optim_state.py`` and
``test_fsspec.py::test_fsspec`` (FSDP1 ``SHARDED_STATE_DICT`` model and optimizer;
``load_sharded_optimizer_state_dict`` with and without a planner), and DCP's
``use_collectives=False`` (every rank its own record) and ``no_dist`` with a process group present.
One spawn runs everything on a DCP folder, then on a real redis-server.

ShardedTensor is deprecated in favour of DTensor but still checkpointable in torch 2.13, so it is
tested; ``sharded_tensor`` needs ``init_rrefs=False`` without RPC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    ShardingSpec,
    ShardMetadata,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load, load_state_dict
from torch.distributed.checkpoint.state_dict_saver import (
    AsyncCheckpointerType,
    async_save,
    save,
    save_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from tests.dcp_semantics.compare import assert_same, rank_failure, upload_of
from tests.dcp_semantics.places import Place, folder, store
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


def chunks(dim: int, order: list[int]) -> ChunkShardingSpec:
    return ChunkShardingSpec(dim=dim, placements=[f"rank:{r}/cpu" for r in order])


def rows(*spans: tuple[int, int, int]) -> EnumerableShardingSpec:
    """Shards of whole rows of a (10, 20) tensor: (first row, row count, rank)."""
    return EnumerableShardingSpec(
        [ShardMetadata([start, 0], [count, 20], f"rank:{r}/cpu") for start, count, r in spans]
    )


SPECS_2D: list[ShardingSpec] = [
    chunks(0, [0, 1]),
    chunks(0, [0, 1, 1, 0]),
    rows((0, 2, 0), (2, 1, 1), (3, 3, 0), (6, 3, 1), (9, 1, 0)),
    rows((0, 8, 1), (8, 2, 0)),
    chunks(1, [0, 1]),  # columns: upstream's rowwise-to-colwise
]
SPECS_1D: list[ShardingSpec] = [
    chunks(0, [0, 1]),
    chunks(0, [0, 1, 1, 0]),
    EnumerableShardingSpec([ShardMetadata([0], [8], "rank:1/cpu"), ShardMetadata([8], [24], "rank:0/cpu")]),
    EnumerableShardingSpec([ShardMetadata([0], [10], "rank:0/cpu"), ShardMetadata([10], [22], "rank:1/cpu")]),
]


def gathered(value: ShardedTensor) -> torch.Tensor | None:
    out = torch.zeros(value.size()) if dist.get_rank() == 0 else None
    value.gather(dst=0, out=out)
    return out


def sharded_tensor_checks(rank: int, place: Place) -> None:
    saved = []
    for i, spec in enumerate(SPECS_2D):
        torch.manual_seed(i)
        value = sharded_tensor.rand(spec, 10, 20, init_rrefs=False)
        save({"st": value, "bytes0": [1], "bytes1": "string"}, storage_writer=place.writer(f"st{i}"))
        saved.append(gathered(value))
    for i, expected in enumerate(saved):
        for j, spec in enumerate(SPECS_2D):
            if i == j:
                continue
            target: dict[str, Any] = {
                "st": sharded_tensor.zeros(spec, 10, 20, init_rrefs=False),
                "bytes0": [2],
                "bytes1": "",
            }
            load(target, storage_reader=place.reader(f"st{i}"))
            assert target["bytes0"] == [1] and target["bytes1"] == "string", place.name
            full = gathered(target["st"])
            if rank == 0:
                assert expected is not None and full is not None and bits_equal(full, expected), (
                    place.name,
                    i,
                    j,
                )

    for i, spec in enumerate(SPECS_1D):  # sharded saved, loaded as a plain tensor; and the reverse
        load_spec = SPECS_1D[(i + 1) % len(SPECS_1D)]
        torch.manual_seed(10 + i)
        state: dict[str, Any] = {
            "sharded": sharded_tensor.rand(spec, 32, init_rrefs=False),
            "replicated": torch.rand(32),
        }
        dist.broadcast(state["replicated"], src=0)
        save(state, storage_writer=place.writer(f"switch{i}"))
        target = {
            "sharded": torch.zeros(32),
            "replicated": sharded_tensor.zeros(load_spec, 32, init_rrefs=False),
        }
        load(target, storage_reader=place.reader(f"switch{i}"))
        expected_sharded, loaded_replicated = gathered(state["sharded"]), gathered(target["replicated"])
        if rank == 0:
            assert expected_sharded is not None and bits_equal(target["sharded"], expected_sharded), (
                place.name
            )
            assert loaded_replicated is not None and bits_equal(loaded_replicated, state["replicated"]), (
                place.name
            )


def coordination_checks(rank: int, place: Place) -> None:
    mine = {"mine": torch.full((4,), float(rank)), "shared": torch.arange(3)}
    save_state_dict(mine, storage_writer=place.writer("coordinator1"), coordinator_rank=1)
    target = {"mine": torch.zeros(4), "shared": torch.zeros(3, dtype=torch.int64)}
    load_state_dict(target, storage_reader=place.reader("coordinator1"), coordinator_rank=1)
    assert bits_equal(target["shared"], torch.arange(3)), place.name  # "mine" is one rank's: DCP dedups

    save(mine, storage_writer=place.writer("local"), use_collectives=False)  # one record per rank
    target = {"mine": torch.zeros(4), "shared": torch.zeros(3, dtype=torch.int64)}
    load(target, storage_reader=place.reader("local"))  # no global record: DCP falls back to the rank's
    assert bits_equal(target["mine"], mine["mine"]), f"{place.name}: rank {rank} got another rank's record"

    if rank == 0:  # one process checkpoints alone while the group exists; another loads it alone
        save({"solo": torch.full((2,), 9.0)}, storage_writer=place.writer("solo"), no_dist=True)
    dist.barrier()
    if rank == 1:
        solo = {"solo": torch.zeros(2)}
        load(solo, storage_reader=place.reader("solo"), no_dist=True)
        assert bits_equal(solo["solo"], torch.full((2,), 9.0)), place.name

    with pytest.raises(CheckpointException) as refused:  # every rank learns of the refusal
        save(mine, storage_writer=place.writer("coordinator1"))
    assert "Checkpoint already exists" in str(rank_failure(refused.value)), place.name


class Gathering:
    """A Stateful whose load_state_dict runs a collective: ranks must load keys in one order."""

    def __init__(self, op: str) -> None:
        self.op, self.loaded = op, False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        value = torch.tensor([dist.get_rank() + 1])
        if self.op == "all_reduce":
            dist.all_reduce(value)
        else:
            dist.all_gather([torch.zeros(1, dtype=torch.int64) for _ in range(2)], value)
        self.loaded = True


def order_and_reuse_checks(rank: int, place: Place) -> None:
    a, b = Gathering("all_gather"), Gathering("all_reduce")
    keys = {"A": a, "B": b} if rank == 0 else {"B": b, "A": a}
    save(keys, storage_writer=place.writer("order"))
    load(keys, storage_reader=place.reader("order"))
    assert a.loaded and b.loaded, place.name

    mesh = init_device_mesh("cpu", (2,))
    steps = [random_tensor((6, 4), torch.float32, seed) for seed in range(3)]
    writer, reader = place.writer(), place.reader()
    for i, full in enumerate(steps):
        state = {"w": distribute_tensor(full, mesh, [Shard(0)])}
        save(state, checkpoint_id=place.id(f"reuse{i}"), storage_writer=writer)
    for i in (2, 0, 1):
        target = {"w": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(1)])}
        load(target, checkpoint_id=place.id(f"reuse{i}"), storage_reader=reader)
        assert bits_equal(target["w"].full_tensor(), steps[i]), f"{place.name}: reuse{i}"
    writer, reader = place.writer("again", overwrite=True), place.reader("again")
    for full in steps:
        save({"w": distribute_tensor(full, mesh, [Shard(0)])}, storage_writer=writer)
        target = {"w": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])}
        load(target, storage_reader=reader)
        assert bits_equal(target["w"].full_tensor(), full), place.name


def async_checks(rank: int, place: Place) -> None:
    mesh = init_device_mesh("cpu", (2,))
    full = random_tensor((16, 4), torch.float32, 7)
    shared = StagingOptions(
        use_pinned_memory=False, use_shared_memory=True, use_async_staging=False, use_non_blocking_copy=False
    )
    background = StagingOptions(False, False, True, False)
    runs = [
        ("thread", AsyncCheckpointerType.THREAD, None),
        ("thread-staged", AsyncCheckpointerType.THREAD, background),
        ("process", AsyncCheckpointerType.PROCESS, None),
        ("process-shm", AsyncCheckpointerType.PROCESS, shared),
    ]
    for name, kind, options in runs:
        stager = None if options is None else DefaultStager(options)
        weight = distribute_tensor(full, mesh, [Shard(0)])
        state = {"w": weight, "meta": {"step": 3}}
        upload = upload_of(
            async_save(
                state, storage_writer=place.writer(name), async_checkpointer_type=kind, async_stager=stager
            )
        )
        weight.to_local().add_(1)  # training goes on
        upload.result(timeout=120)
        if stager is not None:
            stager.close()
        target: dict[str, Any] = {
            "w": distribute_tensor(torch.zeros(16, 4), mesh, [Shard(0)]),
            "meta": {"step": 0},
        }
        load(target, storage_reader=place.reader(name))
        assert bits_equal(target["w"].full_tensor(), full) and target["meta"] == {"step": 3}, (
            place.name,
            name,
        )

    refused = upload_of(
        async_save(
            {"w": torch.ones(2)},
            storage_writer=place.writer("process"),
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
        )
    )
    with pytest.raises(BaseException) as failed:
        refused.result(timeout=120)
    assert "Checkpoint already exists" in str(failed.value), (place.name, repr(failed.value))
    writer = place.writer("process", overwrite=True)
    upload_of(
        async_save(
            {"w": torch.ones(2)}, storage_writer=writer, async_checkpointer_type=AsyncCheckpointerType.PROCESS
        )
    ).result(120)
    target = {"w": torch.zeros(2)}
    load(target, storage_reader=place.reader("process"))
    assert bits_equal(target["w"], torch.ones(2)), place.name


def fsdp1_optimizer_checks(rank: int, place: Place) -> None:
    """FSDP1's sharded state dicts (ShardedTensors) and ``load_sharded_optimizer_state_dict``, which
    reads the checkpoint's metadata from the storage reader itself before loading through it."""

    def build(seed: int) -> tuple[FSDP, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = FSDP(
            nn.Sequential(nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 6)), device_id=torch.device("cpu")
        )
        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT)
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    model, optim = build(seed=0)
    model(torch.rand(8, 8)).sum().backward()
    optim.step()
    before = FSDP.optim_state_dict(model, optim)
    save({"model": model.state_dict(), "optim": before}, storage_writer=place.writer("fsdp1"))

    for planner in (None, DefaultLoadPlanner()):
        fresh, fresh_optim = build(seed=1)
        assert len(fresh_optim.state) == 0  # Adam creates its state lazily
        state = {"model": fresh.state_dict()}  # the optimizer cannot load together with the model
        load(state, storage_reader=place.reader("fsdp1"))
        fresh.load_state_dict(state["model"])
        loaded = load_sharded_optimizer_state_dict(
            model_state_dict=state["model"],
            optimizer_key="optim",
            storage_reader=place.reader("fsdp1"),
            planner=planner,
        )
        fresh_optim.load_state_dict(FSDP.optim_state_dict_to_load(fresh, fresh_optim, loaded["optim"]))
        assert_same(FSDP.optim_state_dict(fresh, fresh_optim)["state"], before["state"], place.name)


class PipelineModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1, self.layer2 = nn.Linear(6, 6), nn.Linear(6, 6)


def stage_weights(stage: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(stage)
    layer = nn.Linear(6, 6)
    return {f"layer{stage + 1}.{name}": value.detach() for name, value in layer.named_parameters()}


def pipeline_checks(rank: int, place: Place) -> None:
    """Upstream's e2e/test_pipeline.py: each rank holds one stage (the rest on the meta device) and
    saves only its own keys into one checkpoint, which an FSDP model on every rank then loads."""
    with torch.device("meta"):
        model = PipelineModel()
    stage = (model.layer1, model.layer2)[rank]
    stage.to_empty(device="cpu")
    torch.manual_seed(rank)
    stage.reset_parameters()
    optim = torch.optim.Adam(stage.parameters(), lr=1e-3)
    model_state, optim_state = get_state_dict(model, optimizers=optim)
    # torch 2.13 keeps the other stages' meta tensors, which no storage can write; newer torch drops them
    model_state = {
        k: v for k, v in model_state.items() if not (isinstance(v, torch.Tensor) and v.device.type == "meta")
    }
    save({"model": model_state, "optim": optim_state}, storage_writer=place.writer("pipeline"))

    whole = PipelineModel()
    fully_shard(whole, mesh=init_device_mesh("cpu", (2,)))
    whole_optim = torch.optim.Adam(whole.parameters(), lr=1e-3)
    msd, osd = get_state_dict(whole, optimizers=whole_optim)
    load({"model": msd, "optim": osd}, storage_reader=place.reader("pipeline"))
    set_state_dict(whole, optimizers=whole_optim, model_state_dict=msd, optim_state_dict=osd)
    full = get_model_state_dict(whole, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert_same(full, stage_weights(0) | stage_weights(1), place.name)


def ranks_scenario(rank: int, world_size: int, places: list[Place]) -> None:
    for place in places:
        sharded_tensor_checks(rank, place)
        coordination_checks(rank, place)
        order_and_reuse_checks(rank, place)
        async_checks(rank, place)
        fsdp1_optimizer_checks(rank, place)
        pipeline_checks(rank, place)
        dist.barrier()


def test_two_ranks(redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    run_ranks(ranks_scenario, 2, [folder(tmp_path), store("redis", redis_server.url(namespace))])
