"""kvckpt.load says when the checkpoint holds entries the state_dict has no place for, under keys the
state_dict has (a fresh optimizer.state_dict() has no state), and what a dtype other than the
stored one does; against a real redis, with a real AdamW."""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import kvckpt
from kvckpt.errors import StateDictMismatchError, UnloadedEntriesError, UnloadedEntriesWarning
from tests.harness.servers import RedisServer
from tests.ranks import run_ranks


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


@pytest.fixture
def url(redis_server: RedisServer, namespace: str) -> str:
    return redis_server.url(namespace)


def test_a_fresh_optimizer_state_dict_warns_that_its_state_stays_empty(url: str) -> None:
    model, optimizer = trained()
    kvckpt.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, url)
    new_model, new_optimizer = fresh()
    target = {"model": new_model.state_dict(), "optim": new_optimizer.state_dict()}
    with pytest.warns(UnloadedEntriesWarning) as caught:
        kvckpt.load(target, url)
    message = str(caught[0].message)
    assert "12 entries that the state_dict has no place for" in message
    assert "'optim.state.0.exp_avg', 'optim.state.0.exp_avg_sq', 'optim.state.0.step', …" in message
    assert "torch.distributed.checkpoint.state_dict.get_state_dict" in message and "strict=True" in message
    assert caught[0].filename == __file__  # points at the caller's load
    assert target["optim"]["state"] == {}  # what the warning is about
    assert torch.equal(target["model"]["0.weight"], model.state_dict()["0.weight"])

    kvckpt.save(optimizer.state_dict(), f"{url}-bare")  # the optimizer's own state_dict at the top
    with pytest.warns(UnloadedEntriesWarning, match=r"12 entries .*\('state\.0\.exp_avg'"):
        kvckpt.load(fresh()[1].state_dict(), f"{url}-bare")


def test_strict_refuses_before_loading_anything(url: str) -> None:
    model, optimizer = trained()
    kvckpt.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, url)
    new_model, new_optimizer = fresh()
    target = {"model": new_model.state_dict(), "optim": new_optimizer.state_dict()}
    before = target["model"]["0.weight"].clone()
    with pytest.raises(UnloadedEntriesError, match="nothing was loaded") as raised:
        kvckpt.load(target, url, strict=True)
    assert isinstance(raised.value, StateDictMismatchError)
    assert raised.value.fqns[:2] == ["optim.state.0.exp_avg", "optim.state.0.exp_avg_sq"]
    assert len(raised.value.fqns) == 12
    assert torch.equal(target["model"]["0.weight"], before)


def test_get_state_dict_loads_everything_quietly(url: str) -> None:
    model, optimizer = trained()
    saved_model, saved_optim = get_state_dict(model, optimizer)
    kvckpt.save({"model": saved_model, "optim": saved_optim}, url)
    new_model, new_optimizer = fresh()
    model_sd, optim_sd = get_state_dict(new_model, new_optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnloadedEntriesWarning)
        kvckpt.load({"model": model_sd, "optim": optim_sd}, url, strict=True)
    set_state_dict(new_model, new_optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    restored = new_optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(restored, optimizer.state_dict()["state"][0]["exp_avg"])


def test_keys_the_state_dict_lacks_altogether_are_a_partial_load(url: str, tmp_path: Path) -> None:
    model, optimizer = trained()
    saved = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    kvckpt.save(saved, url)
    dcp.save(saved, checkpoint_id=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnloadedEntriesWarning)
        kvckpt.load({"model": fresh()[0].state_dict()}, url, strict=True)
    with pytest.warns(UnloadedEntriesWarning, match="12 entries"):  # a DCP folder is checked alike
        kvckpt.load({"model": fresh()[0].state_dict(), "optim": fresh()[1].state_dict()}, str(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool])
def test_a_target_of_another_dtype_gets_the_values_converted(url: str, dtype: torch.dtype) -> None:
    """What README's "dtype on load" says: no error, torch's copy_ conversion into the target."""
    stored = torch.tensor([1.5, -2.7, 0.0, 70000.0])
    kvckpt.save({"w": stored}, url)
    target = {"w": torch.empty(4, dtype=dtype)}
    kvckpt.load(target, url)
    assert target["w"].dtype == dtype
    assert torch.equal(target["w"], stored.to(dtype))
    if dtype == torch.float16:
        assert target["w"][3].item() == float("inf")  # out of range becomes inf, silently


def split_scenario(rank: int, world_size: int, url: str) -> None:
    """Each rank holds its own part of "model" (pipeline stages): together they hold everything."""
    mine = {"model": {"a" if rank == 0 else "b": torch.zeros(2)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnloadedEntriesWarning)
        kvckpt.load(mine, url, strict=True)
    assert torch.equal(next(iter(mine["model"].values())), torch.full((2,), float(rank + 1)))
    lacking = {"model": {"a" if rank == 0 else "b": torch.zeros(2)}, "opt": {}}
    try:
        kvckpt.load(lacking, url, strict=True)
    except UnloadedEntriesError as error:  # every rank refuses together: none waits in the load
        assert error.fqns == ["opt.state.x"], error.fqns
    else:
        raise AssertionError(f"rank {rank}: strict load did not refuse")


@pytest.mark.slow
def test_ranks_holding_parts_are_judged_together(redis_server: RedisServer) -> None:
    url = redis_server.url(f"unloaded-{uuid.uuid4().hex[:12]}")
    saved: dict[str, Any] = {"model": {"a": torch.ones(2), "b": torch.full((2,), 2.0)}}
    saved["opt"] = {"state": {"x": torch.ones(1)}}
    kvckpt.save(saved, url)
    run_ranks(split_scenario, 2, url)
