"""A stored object whose unpickling would run code is refused under any planner, against a real redis."""

from __future__ import annotations

import os
import sys
import threading
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

import kvckpt
from kvckpt.cli import main as cli
from kvckpt.dcp import safe_load
from kvckpt.errors import PickleLoadWarning, UnsafeObjectError
from tests.harness.servers import RedisServer


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile(redis_server: RedisServer, namespace: str, tmp_path: Path) -> tuple[str, Path]:
    marker = tmp_path / "ran"
    url = redis_server.url(namespace)
    kvckpt.save({"w": torch.ones(2), "payload": RunsACommand(marker)}, url)
    return url, marker


def fresh() -> dict[str, Any]:
    return {"w": torch.zeros(2), "payload": None}


@pytest.mark.parametrize(
    "planner",
    [
        None,
        DefaultLoadPlanner(allow_partial_load=True),
        DefaultLoadPlanner(),
        kvckpt.SafeLoadPlanner(allow_pickle=True),  # the planner allows it; load's own flag does not
    ],
    ids=["default", "partial", "dcp-default", "permissive-safe-planner"],
)
def test_any_planner_keeps_the_safe_load(hostile: tuple[str, Path], planner: Any) -> None:
    url, marker = hostile
    with pytest.raises(UnsafeObjectError) as refused:
        kvckpt.load(fresh(), url, planner=planner)
    assert not marker.exists()
    assert "'payload'" in str(refused.value) and "system" in refused.value.refused  # type: ignore[attr-defined]
    assert "allow_pickle=True" in str(refused.value)


def test_allow_pickle_is_the_explicit_way_to_run_pickles(hostile: tuple[str, Path]) -> None:
    url, marker = hostile
    kvckpt.load(fresh(), url, planner=DefaultLoadPlanner(), allow_pickle=True)
    assert marker.exists()


def test_plain_dcp_load_warns_once_pointing_to_the_safe_way(
    hostile: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, marker = hostile
    monkeypatch.setattr(safe_load, "_warned", threading.Event())
    with pytest.warns(PickleLoadWarning, match=r"kvckpt\.load\(state_dict, checkpoint_id\)"):
        dcp_load(fresh(), storage_reader=kvckpt.KVStorageReader(url))
    assert marker.exists()  # DCP's own behaviour, now after a warning

    with warnings.catch_warnings():
        warnings.simplefilter("error", PickleLoadWarning)
        dcp_load(fresh(), storage_reader=kvckpt.KVStorageReader(url))  # once per process
    marker.unlink()
    for reader, planner in [
        (kvckpt.KVStorageReader(url), kvckpt.SafeLoadPlanner()),
        (kvckpt.KVStorageReader(url, allow_pickle=False), None),
    ]:
        with pytest.raises(CheckpointException) as raised:  # plain dcp.load wraps every failure
            dcp_load(fresh(), storage_reader=reader, planner=planner)
        (failure,) = raised.value.failures.values()
        assert isinstance(failure[0] if isinstance(failure, tuple) else failure, UnsafeObjectError)
    assert not marker.exists()


def test_the_refusal_names_the_class_without_terminal_escapes(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class whose module name carries terminal escapes: the message shows them as text."""
    name = "evil\x1b[2J\x1b[31mmod"
    module = types.ModuleType(name)

    class Thing:
        pass

    Thing.__module__, Thing.__qualname__ = name, "Thing"
    module.Thing = Thing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, module)
    url = redis_server.url(namespace)
    kvckpt.save({"thing": Thing()}, url)
    with pytest.raises(UnsafeObjectError) as refused:
        kvckpt.load({"thing": None}, url)
    message = str(refused.value)
    assert "\x1b" not in message
    assert "evil\\x1b[2J\\x1b[31mmod.Thing" in message


def test_cp_to_a_folder_and_drain_copy_pickled_values_as_bytes_without_a_pickle_warning(
    redis_server: RedisServer, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy hands stored bytes on: nothing is unpickled, so nothing warns that it would be."""
    marker = tmp_path / "ran"
    url = redis_server.url(f"{namespace}/step1")
    kvckpt.save({"w": torch.ones(2), "step": 3, "payload": RunsACommand(marker)}, url)
    copies: list[Callable[[], int]] = [
        lambda: cli.main(["cp", url, str(tmp_path / "export")]),
        lambda: kvckpt.Drainer(redis_server.url(namespace), str(tmp_path / "drained")).run(once=True),
    ]
    for copy in copies:
        monkeypatch.setattr(safe_load, "_warned", threading.Event())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert copy() == 0
        assert [w for w in caught if issubclass(w.category, PickleLoadWarning)] == []
    assert not marker.exists()
    for folder in (tmp_path / "export", tmp_path / "drained" / "step1"):
        loaded: dict[str, Any] = {"w": torch.zeros(2), "step": 0}
        dcp_load(loaded, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=True))
        assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.ones(2))
