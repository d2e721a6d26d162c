"""Training resume: an FSDP2 model and AdamW trained on 4 ranks, checkpointed, resumed on 2 ranks.

The 4-rank job keeps training after its checkpoint; the resumed 2-rank job must reproduce that run:
the same model and optimizer state, bit for bit, and the same next-step loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import kvckpt
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

SAVED_AT = 3


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> float:
    """Every rank sees the same batch, so the loss does not depend on the world size."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)
    loss = F.mse_loss(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    optim.step()
    optim.zero_grad()
    return float(loss.item())


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gathered on rank 0 (empty elsewhere): the reference both jobs are compared on."""
    return get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def train_scenario(rank: int, world_size: int, url: str, reference: str) -> None:
    model, optim = build(seed=0)
    for step in range(SAVED_AT):
        train_step(model, optim, step)
    model_state, optim_state = get_state_dict(model, optim)
    kvckpt.save({"model": model_state, "optim": optim_state, "trainer": {"step": SAVED_AT}}, url)
    model_full, optim_full = full_state(model, optim)
    losses = [train_step(model, optim, step) for step in (SAVED_AT, SAVED_AT + 1)]
    if rank == 0:  # test-side scratch file, not a kvckpt format
        torch.save({"losses": losses, "model": model_full, "optim": optim_full}, reference)


def resume_scenario(rank: int, world_size: int, url: str, reference: str) -> None:
    model, optim = build(seed=1)  # other weights: only the checkpoint can make the runs agree
    model_state, optim_state = get_state_dict(model, optim)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state, "trainer": {"step": None}}
    kvckpt.load(state, url)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert state["trainer"]["step"] == SAVED_AT
    model_full, optim_full = full_state(model, optim)
    losses = [train_step(model, optim, step) for step in (SAVED_AT, SAVED_AT + 1)]
    if rank != 0:
        return
    expected = torch.load(reference)
    assert_same(model_full, expected["model"], "model")
    assert_same(optim_full, expected["optim"], "optim")
    # The next step's forward only reads the restored weights: identical to the uninterrupted run.
    assert losses[0] == expected["losses"][0], (losses, expected["losses"])
    # The step after also went through AdamW's restored moments; gradient averaging over 2 ranks
    # instead of 4 may round differently, so agreement here is to float32 precision.
    assert losses[1] == pytest.approx(expected["losses"][1], rel=1e-6, abs=0)


def assert_same(actual: Any, expected: Any, path: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and bits_equal(actual, expected), path
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


def test_fsdp2_resume_on_fewer_ranks(redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    url, reference = redis_server.url(namespace), str(tmp_path / "reference.pt")
    run_ranks(train_scenario, 4, url, reference)
    run_ranks(resume_scenario, 2, url, reference)
