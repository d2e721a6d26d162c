"""Conversions between DCP and ``torch.save`` files, with the checkpoint passing through kvckpt.

Mirrors upstream ``test_format_utils.py`` (and ``test_dcp_to_torch_save.py`` /
``test_torch_save_to_dcp.py``): ``dcp_to_torch_save`` and ``torch_save_to_dcp`` only read and write
DCP folders, so a store takes part through ``kvckpt.copy``: folder → store → folder must keep a
checkpoint that ``dcp_to_torch_save`` turns into the original state dict, and a folder made by
``torch_save_to_dcp`` must load from the store with ``dcp.load``.

Not mirrored: upstream's ``BroadcastingTorchSaveReader`` + ``DynamicMetaLoadPlanner`` read a
``torch.save`` file directly, with no checkpoint storage in between.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save

import kvckpt
from kvckpt.dcp.reader import KVStorageReader
from tests.conftest import Backend
from tests.dcp_semantics.compare import assert_same

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class UnevenModel(nn.Module):
    """Upstream's SimpleModelUneven: layer sizes that do not divide evenly."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net1, self.net2 = nn.Linear(5, 10), nn.Linear(10, 15)
        self.net3, self.net4 = nn.Linear(15, 30), nn.Linear(30, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net4(F.relu(self.net3(F.relu(self.net2(F.relu(self.net1(x)))))))
        return out


def test_dcp_to_torch_save_after_a_trip_through_the_store(
    url_backend: Backend, namespace: str, tmp_path: Path
) -> None:
    model = UnevenModel(seed=0)
    save({"model": model, "epoch": 3}, checkpoint_id=str(tmp_path / "saved"))
    url = url_backend.id(namespace)
    kvckpt.copy(tmp_path / "saved", url)
    kvckpt.copy(url, tmp_path / "exported")
    dcp_to_torch_save(tmp_path / "exported", tmp_path / "model.pt")
    assert_same(torch.load(tmp_path / "model.pt"), {"model": model.state_dict(), "epoch": 3})


def test_torch_save_to_dcp_then_load_from_the_store(
    url_backend: Backend, namespace: str, tmp_path: Path
) -> None:
    state = {"model": UnevenModel(seed=0).state_dict(), "note": "from torch.save"}
    torch.save(state, tmp_path / "model.pt")
    torch_save_to_dcp(tmp_path / "model.pt", tmp_path / "converted")
    url = url_backend.id(namespace)
    kvckpt.copy(tmp_path / "converted", url)

    model = UnevenModel(seed=1)
    target = {"model": model, "note": ""}
    load(target, storage_reader=KVStorageReader(url))
    assert_same({"model": model.state_dict(), "note": target["note"]}, state)
