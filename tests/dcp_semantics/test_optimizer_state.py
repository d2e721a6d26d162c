"""Optimizer state through ``get_state_dict``/``set_state_dict``, with frozen and missing parameters.

Mirrors upstream ``test_optimizer_frozen_state.py`` (a parameter frozen after the optimizer stepped
keeps its state across a round trip), ``e2e/test_fine_tuning.py`` (parameters frozen before training
have no optimizer state; checkpoints saved with ``ignore_frozen_params`` lack them and load with
``strict=False``), ``e2e/test_e2e_save_and_load.py::TestInitStateDict`` (DCP loads into the template
objects in place; ``set_state_dict`` restores non-tensor optimizer settings such as ``lr``) and
``test_optimizer_flattened_missing_state.py`` (a flattened optimizer state dict; state missing for a
parameter). Every checkpoint goes to a DCP folder and to kvckpt; both must restore the same run.

Upstream's check that ``set_optimizer_state_dict`` reports "Missing optimizer state" is newer than
torch 2.13, whose ``set_optimizer_state_dict`` fails on such a dict with a TypeError before any
storage is involved; here the missing state is met where storage matters: at load time, where DCP
refuses the key or, with ``allow_partial_load``, leaves the template's value.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save

from tests.dcp_semantics.compare import assert_same, rank_failure
from tests.dcp_semantics.places import Place

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def build(seed: int, lr: float = 0.1) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def step(model: nn.Module, optim: torch.optim.Optimizer, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(5, 4, generator=gen)).square().mean()
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return float(loss.item())


def test_parameter_frozen_before_training_has_no_state_and_resumes(places: list[Place]) -> None:
    model, optim = build(seed=0)
    model[0].weight.requires_grad_(False)
    for i in range(2):
        step(model, optim, i)
    model_state, optim_state = get_state_dict(model, optim)
    assert "0.weight" not in optim_state["state"] and "0.weight" in model_state
    reference, reference_optim = copy.deepcopy((model, optim))  # the run as it continues
    expected_loss = step(reference, reference_optim, 2)
    for place in places:
        save({"model": model_state, "optim": optim_state}, storage_writer=place.writer("frozen"))

        resumed, resumed_optim = build(seed=1, lr=0.2)
        resumed[0].weight.requires_grad_(False)
        msd, osd = get_state_dict(resumed, resumed_optim)
        target = {"model": msd, "optim": osd}
        load(target, storage_reader=place.reader("frozen"))
        assert target["model"] is msd and target["optim"] is osd, place.name  # loaded in place
        set_state_dict(resumed, resumed_optim, model_state_dict=msd, optim_state_dict=osd)
        assert resumed_optim.param_groups[0]["lr"] == 0.1, place.name
        assert_same(get_state_dict(resumed, resumed_optim), (model_state, optim_state), place.name)
        assert step(resumed, resumed_optim, 2) == expected_loss, place.name
        assert_same(resumed.state_dict(), reference.state_dict(), place.name)


def test_parameter_frozen_after_a_step_keeps_its_state(places: list[Place]) -> None:
    """torch 2.13 builds a fresh optimizer's template without state for a frozen parameter (newer
    torch keeps it), so the restored model freezes the parameter after loading, as training did."""
    model, optim = build(seed=0)
    step(model, optim, 0)
    model[0].weight.requires_grad_(False)
    saved = get_optimizer_state_dict(model, optim)
    assert "0.weight" in saved["state"]
    for place in places:
        save({"optim": saved}, storage_writer=place.writer("frozen-after"))
        fresh_model, fresh = build(seed=0)
        template = get_optimizer_state_dict(fresh_model, fresh)
        load({"optim": template}, storage_reader=place.reader("frozen-after"))
        set_optimizer_state_dict(fresh_model, fresh, template)
        fresh_model[0].weight.requires_grad_(False)
        assert set(fresh.state_dict()["state"]) == set(optim.state_dict()["state"]), place.name
        assert_same(get_optimizer_state_dict(fresh_model, fresh), saved, place.name)


def test_fine_tuning_checkpoint_without_frozen_parameters(places: list[Place]) -> None:
    skip_frozen = StateDictOptions(ignore_frozen_params=True)
    model, optim = build(seed=0)
    model[0].requires_grad_(False)  # a "pretrained" layer
    step(model, optim, 0)
    model_state, optim_state = get_state_dict(model, optim, options=skip_frozen)
    assert set(model_state) == {"2.weight", "2.bias"}
    for place in places:
        save({"model": model_state, "optim": optim_state}, storage_writer=place.writer("finetune"))

        resumed, resumed_optim = build(seed=1)
        layer = resumed[0]  # a "pretrained" layer
        assert isinstance(layer, nn.Linear)
        layer.requires_grad_(False)
        pretrained = layer.weight.clone()
        full_msd, full_osd = get_state_dict(resumed, resumed_optim)
        with pytest.raises(CheckpointException) as refused:  # the template asks for the frozen weights
            load({"model": full_msd, "optim": full_osd}, storage_reader=place.reader("finetune"))
        assert "Missing key in checkpoint state_dict: model.0.weight" in str(rank_failure(refused.value))

        msd, osd = get_state_dict(resumed, resumed_optim, options=skip_frozen)
        load({"model": msd, "optim": osd}, storage_reader=place.reader("finetune"))
        options = StateDictOptions(strict=False)
        set_state_dict(resumed, resumed_optim, model_state_dict=msd, optim_state_dict=osd, options=options)
        assert torch.equal(layer.weight, pretrained), place.name  # not in the checkpoint: untouched
        assert_same(get_state_dict(resumed, resumed_optim, options=skip_frozen), (model_state, optim_state))


def test_flattened_optimizer_state_with_state_missing_for_a_parameter(places: list[Place]) -> None:
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    model, optim = build(seed=0)
    step(model, optim, 0)
    full = get_optimizer_state_dict(model, optim, options=flat)
    assert "state.2.weight.exp_avg" in full  # flattened: one key per value, dots inside the key
    pruned = {key: value for key, value in full.items() if not key.startswith("state.2.weight.")}
    for place in places:
        save({"optim": full}, storage_writer=place.writer("flat"))
        fresh_model, fresh = build(seed=0)
        template = get_optimizer_state_dict(fresh_model, fresh, options=flat)
        load({"optim": template}, storage_reader=place.reader("flat"))
        set_optimizer_state_dict(fresh_model, fresh, template, options=flat)
        assert_same(get_optimizer_state_dict(fresh_model, fresh, options=flat), full, place.name)

        save({"optim": pruned}, storage_writer=place.writer("flat-pruned"))
        template = get_optimizer_state_dict(*build(seed=0), options=flat)
        with pytest.raises(CheckpointException) as refused:
            load({"optim": template}, storage_reader=place.reader("flat-pruned"))
        assert "Missing key in checkpoint state_dict: optim.state.2.weight." in str(
            rank_failure(refused.value)
        )
        untouched: dict[str, Any] = {
            # flattened, so every value is a tensor, though torch types the dict as the nested form
            key: cast(torch.Tensor, value).clone()
            for key, value in template.items()
            if key.startswith("state.2.weight.")
        }
        load(
            {"optim": template},
            storage_reader=place.reader("flat-pruned"),
            planner=DefaultLoadPlanner(allow_partial_load=True),
        )
        assert_same({k: v for k, v in template.items() if k in pruned}, pruned, place.name)
        assert_same(
            {k: v for k, v in template.items() if k.startswith("state.2.weight.")}, untouched, place.name
        )
