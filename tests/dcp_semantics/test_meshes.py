"""DTensor checkpoints on 2-D meshes, resharded on load, on 4 real gloo ranks.

Mirrors upstream ``test_dtensor_resharding.py`` (every change of placements on a 2x2 mesh, 1-D to
2-D and 2-D to 1-D), ``test_2d_fsdp_dt_checkpoint.py``/``test_fsdp_tp_checkpoint_conversion.py``/
``test_tp_checkpoint.py`` and ``e2e/test_e2e_save_and_load.py::test_e2e`` (an FSDP x TP model with its
optimizer, a Stateful object and a BytesIO train state, saved, loaded into other parallelisms, and
trained on), ``test_hsdp_checkpoint.py`` (HSDP: replicas hold the same shards and one copy is stored),
``test_list_stored_state_dict.py`` (the stored metadata of a 2-D DTensor and a BytesIO) and
``e2e/test_e2e_save_and_load.py::test_partial_load`` (``_load_state_dict_from_keys`` on every rank).
Also beyond upstream: 2-D checkpoints loaded on 2 ranks and on one process without a process group.

One spawn runs everything, first on a DCP folder, then on a real redis-server; the two must agree.
FSDP here is FSDP2 (``fully_shard``): FSDP1 and DDP wrap the same DTensor state dicts on CPU.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys, load
from torch.distributed.checkpoint.state_dict_saver import save
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from tests.dcp_semantics.compare import assert_same
from tests.dcp_semantics.places import Place, folder, store
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

#: Upstream's 4x4 arange, and an uneven tensor whose shards differ in size.
TENSORS = {
    "even": torch.arange(16, dtype=torch.float32).view(4, 4),
    "uneven": random_tensor((5, 7), torch.bfloat16, 3),
}
TWO_D: list[tuple[Placement, ...]] = [
    (Replicate(), Replicate()),
    (Replicate(), Shard(0)),
    (Shard(0), Replicate()),
    (Shard(0), Shard(0)),
    (Shard(0), Shard(1)),
]
ONE_D: list[tuple[Placement, ...]] = [(Shard(0),), (Replicate(),), (Shard(1),)]


def dtensors(mesh: DeviceMesh, placements: tuple[Placement, ...], fill: bool) -> dict[str, Any]:
    return {
        name: distribute_tensor(full if fill else torch.zeros_like(full), mesh, list(placements))
        for name, full in TENSORS.items()
    }


def check_full(state: dict[str, Any], where: str) -> None:
    for name, full in TENSORS.items():
        value = state[name]
        gathered = value.full_tensor() if isinstance(value, DTensor) else value
        assert bits_equal(gathered, full), f"{where}: {name}"


def reshard_checks(rank: int, place: Place, meshes: dict[int, DeviceMesh], pair: DeviceMesh) -> None:
    layouts = [(meshes[2], p) for p in TWO_D] + [(meshes[1], p) for p in ONE_D]
    for i, (mesh, placements) in enumerate(layouts):
        save(dtensors(mesh, placements, fill=True), storage_writer=place.writer(f"dt{i}"))
    for i, (saved_mesh, saved) in enumerate(layouts):
        for mesh, placements in layouts:
            if (mesh, placements) == (saved_mesh, saved):
                continue
            state = dtensors(mesh, placements, fill=False)
            load(state, storage_reader=place.reader(f"dt{i}"))
            check_full(state, f"{place.name}: {saved} on {saved_mesh.ndim}-D loaded as {placements}")
        if rank < 2:  # the same checkpoint on 2 ranks, and on one process without a process group
            state = dtensors(pair, (Shard(1),), fill=False)
            load(state, storage_reader=place.reader(f"dt{i}"), process_group=pair.get_group())
            check_full(state, f"{place.name}: {saved} loaded on 2 ranks")
        if rank == 0:
            plain = {name: torch.zeros_like(full) for name, full in TENSORS.items()}
            load(plain, storage_reader=place.reader(f"dt{i}"), no_dist=True)
            check_full(plain, f"{place.name}: {saved} loaded without a process group")
        dist.barrier()


class DummyModel(nn.Module):
    """Upstream's TestDummyModel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1, self.net2 = nn.Linear(8, 16), nn.Linear(16, 32)
        self.net3, self.net4 = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net4(F.relu(self.net3(F.relu(self.net2(F.relu(self.net1(x))))))))


class TrainState(Stateful):
    def __init__(self, step: int = 0, losses: list[float] | None = None) -> None:
        self.step, self.losses = step, list(losses or [])

    def state_dict(self) -> dict[str, Any]:
        history = io.BytesIO()
        torch.save(self.losses, history)
        return {"step": torch.tensor(self.step), "losses": history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        state_dict["losses"].seek(0)
        self.losses = torch.load(state_dict["losses"])


def parallelize(kind: str, mesh2d: DeviceMesh, mesh1d: DeviceMesh) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = DummyModel()
    if kind == "fsdp_tp":
        parallelize_module(model, mesh2d["tp"], {"net1": ColwiseParallel(), "net2": RowwiseParallel()})
        fully_shard(model, mesh=mesh2d["dp"])
    elif kind == "hsdp":  # a 2-D mesh given to fully_shard: replicate over dim 0, shard over dim 1
        fully_shard(model, mesh=mesh2d)
    else:
        fully_shard(model, mesh=mesh1d)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for n in steps:
        gen = torch.Generator().manual_seed(n)  # every rank the same batch: no data parallel split
        loss = model(torch.rand(8, 8, generator=gen)).sum()
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.item()))
    return losses


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_checks(rank: int, place: Place, mesh2d: DeviceMesh, mesh1d: DeviceMesh, hsdp: DeviceMesh) -> None:
    for saved_kind in ("fsdp_tp", "hsdp"):
        model, optim = parallelize(saved_kind, mesh2d if saved_kind == "fsdp_tp" else hsdp, mesh1d)
        losses = train(model, optim, range(2))
        model_state, optim_state = get_state_dict(model, optim)
        name = f"model-{saved_kind}"
        save(
            {"model": model_state, "optim": optim_state, "train": TrainState(2, losses)},
            storage_writer=place.writer(name),
        )
        expected_full = copy.deepcopy(get_state_dict(model, optim, options=FULL))  # not live tensors
        next_loss = train(model, optim, range(2, 3))

        for kind in ("fsdp_tp", "fsdp", "hsdp"):
            fresh, fresh_optim = parallelize(kind, mesh2d if kind == "fsdp_tp" else hsdp, mesh1d)
            train(fresh, fresh_optim, range(5, 6))  # other weights and moments than the checkpoint's
            msd, osd = get_state_dict(fresh, fresh_optim)
            train_state = TrainState()
            load({"model": msd, "optim": osd, "train": train_state}, storage_reader=place.reader(name))
            set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd)
            where = f"{place.name}: {saved_kind} loaded into {kind}"
            assert (train_state.step, train_state.losses) == (2, losses), where
            assert_same(get_state_dict(fresh, fresh_optim, options=FULL), expected_full, where)
            assert train(fresh, fresh_optim, range(2, 3)) == pytest.approx(next_loss, rel=1e-5), where

        if saved_kind == "fsdp_tp":  # every rank reads the whole model, with no template
            whole = _load_state_dict_from_keys("model", storage_reader=place.reader(name))["model"]
            if rank == 0:  # where the FULL reference was gathered
                assert_same(whole, expected_full[0], f"{place.name}: _load_state_dict_from_keys")


def listing_checks(rank: int, places: list[Place], mesh2d: DeviceMesh) -> None:
    listed = []
    for place in places:
        weight = distribute_tensor(TENSORS["even"], mesh2d, [Shard(0), Replicate()])
        save(
            {"distributed_weight": weight, "bytes_data": io.BytesIO(b"TrainingEpoch:4")},
            storage_writer=place.writer("ls"),
        )
        listed.append(place.reader("ls").read_metadata().state_dict_metadata)
    folder_listing, store_listing = listed
    assert store_listing == folder_listing
    assert store_listing["distributed_weight"].size == torch.Size([4, 4])  # type: ignore[union-attr]
    assert len(store_listing["distributed_weight"].chunks) == 2  # type: ignore[union-attr]  # replicas stored once


def mesh_scenario(rank: int, world_size: int, places: list[Place]) -> None:
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    mesh1d = init_device_mesh("cpu", (4,))
    pair = DeviceMesh("cpu", [0, 1])
    for place in places:
        reshard_checks(rank, place, {1: mesh1d, 2: mesh2d}, pair)
        model_checks(rank, place, mesh2d, mesh1d, hsdp)
    listing_checks(rank, places, mesh2d)


def test_2d_meshes_resharded(redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    run_ranks(mesh_scenario, 4, [folder(tmp_path), store("redis", redis_server.url(namespace))])
