"""Loading part of a checkpoint, on a DCP folder and on kvckpt.

Mirrors upstream ``e2e/test_e2e_save_and_load.py::test_partial_load`` (a model loaded alone from a
model+optimizer checkpoint; ``_load_state_dict_from_keys`` for ``"model"`` and
``"optimizer.state"``), ``test_state_dict_utils.py``/``test_planner.py`` on
``DefaultLoadPlanner(allow_partial_load=True)``, and the errors DCP raises for a key the checkpoint
lacks or a tensor whose size differs: kvckpt must raise the same ones, not a storage error.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys, load
from torch.distributed.checkpoint.state_dict_saver import save

from tests.dcp_semantics.compare import assert_same, rank_failure
from tests.dcp_semantics.places import Place
from tests.helpers import random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.rand(3, 8)).sum().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def save_model_and_optimizer(place: Place, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    model, optim = trained(seed=0)
    state = {"model": model.state_dict(), "optimizer": optim.state_dict()}
    save(state, storage_writer=place.writer(name), no_dist=True)
    return state["model"], state["optimizer"]


def test_model_loads_alone_from_a_model_and_optimizer_checkpoint(places: list[Place]) -> None:
    for place in places:
        model_state, _ = save_model_and_optimizer(place, "partial")
        fresh, _ = trained(seed=1)
        target = {"model": fresh.state_dict()}
        load(target, storage_reader=place.reader("partial"), no_dist=True)
        assert_same(target["model"], model_state, place.name)


def test_load_state_dict_from_keys(places: list[Place]) -> None:
    """No template: DCP builds the state dict from the stored metadata, only for the keys asked."""
    for place in places:
        model_state, optim_state = save_model_and_optimizer(place, "keys")
        model_only = _load_state_dict_from_keys("model", storage_reader=place.reader("keys"))
        assert set(model_only) == {"model"}, place.name
        assert_same(model_only["model"], model_state, place.name)

        state_only = _load_state_dict_from_keys("optimizer.state", storage_reader=place.reader("keys"))
        assert set(state_only) == {"optimizer"} and set(state_only["optimizer"]) == {"state"}, place.name
        loaded = state_only["optimizer"]["state"]
        for param, moments in optim_state["state"].items():  # keys come back as the strings stored
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert_same(loaded[str(param)][name], moments[name], f"{place.name}: state.{param}.{name}")

        everything = _load_state_dict_from_keys(storage_reader=place.reader("keys"))
        assert_same(everything["model"], model_state, place.name)
        assert everything["optimizer"]["param_groups"] == optim_state["param_groups"], place.name


def test_key_missing_from_the_checkpoint(places: list[Place]) -> None:
    """Refused by default with DCP's own error; skipped (left as it was) with allow_partial_load."""
    saved = {"w": random_tensor((4, 4), torch.float32, 1)}
    errors = []
    for place in places:
        save(saved, storage_writer=place.writer("missing"), no_dist=True)
        with pytest.raises(CheckpointException) as refused:
            target = {"w": torch.zeros(4, 4), "absent": torch.zeros(2)}
            load(target, storage_reader=place.reader("missing"), no_dist=True)
        errors.append(rank_failure(refused.value))

        kept = torch.full((2,), 7.0)
        target = {"w": torch.zeros(4, 4), "absent": kept}
        planner = DefaultLoadPlanner(allow_partial_load=True)
        load(target, storage_reader=place.reader("missing"), planner=planner, no_dist=True)
        assert_same(target["w"], saved["w"], place.name)
        assert target["absent"] is kept and bool((kept == 7.0).all()), place.name
    folder_error, store_error = errors
    assert type(store_error) is type(folder_error) and str(store_error) == str(folder_error)
    assert "Missing key in checkpoint state_dict: absent" in str(store_error)


def test_tensor_size_mismatch(places: list[Place]) -> None:
    errors = []
    for place in places:
        save({"w": torch.ones(4, 4)}, storage_writer=place.writer("size"), no_dist=True)
        with pytest.raises(CheckpointException) as refused:
            load({"w": torch.zeros(3, 4)}, storage_reader=place.reader("size"), no_dist=True)
        errors.append(rank_failure(refused.value))
    folder_error, store_error = errors
    assert type(store_error) is type(folder_error) and str(store_error) == str(folder_error)
    assert "Size mismatch" in str(store_error)
