"""torch's private names, looked up by kvckpt.integrations.torch_private: a name the installed torch
lacks is UnsupportedTorchError naming it, the installed torch and the tested range."""

from __future__ import annotations

import pickle
import re

import pytest
import torch

import kvckpt
from kvckpt.integrations.torch_private import (
    PROCESS_EXECUTE_SAVE,
    STORAGE_SETUP,
    TESTED_TORCH,
    PatchPoint,
    private,
)


def test_every_name_kvckpt_uses_exists_in_this_torch() -> None:
    from kvckpt.integrations import torch_private

    assert torch_private.fsspec_reader().__name__ == "FsspecReader"
    assert torch_private.fsspec_writer().__name__ == "FsspecWriter"
    assert torch_private.flatten_state_dict({"a": {"b": 1}})[0] == {"a.b": 1}
    assert all(callable(point.get()) for point in (*STORAGE_SETUP, PROCESS_EXECUTE_SAVE))


def test_a_missing_attribute_is_named_with_the_torch_version_and_the_tested_range() -> None:
    with pytest.raises(kvckpt.UnsupportedTorchError) as raised:
        private("torch.distributed.checkpoint", "_kvckpt_no_such_name")
    message = str(raised.value)
    assert "torch.distributed.checkpoint._kvckpt_no_such_name" in message
    assert f"torch {torch.__version__} has no" in message
    assert re.search(rf"tested with torch {TESTED_TORCH[0]} to {TESTED_TORCH[1]}", message)
    assert "pip install" in message
    error = raised.value
    assert (error.missing, error.torch_version, error.tested) == (
        "torch.distributed.checkpoint._kvckpt_no_such_name",
        torch.__version__,
        ("2.13.0", "2.14.1"),
    )
    assert pickle.loads(pickle.dumps(error)).missing == error.missing  # DCP gathers errors across ranks


def test_a_missing_module_is_named_too() -> None:
    with pytest.raises(
        kvckpt.UnsupportedTorchError, match=r"no torch\.distributed\._kvckpt_gone\.thing \(module"
    ):
        private("torch.distributed._kvckpt_gone", "thing")


def test_a_patch_point_torch_lacks_changes_nothing() -> None:
    point = PatchPoint("torch.distributed.checkpoint._storage_utils", "_kvckpt_no_such_function")
    with pytest.raises(kvckpt.UnsupportedTorchError, match=r"_storage_utils\._kvckpt_no_such_function"):
        point.replace(print)
    assert not hasattr(STORAGE_SETUP[0].holder(), "_kvckpt_no_such_function")


def test_a_replaced_class_attribute_is_put_back_exactly() -> None:
    """An attribute the class only inherited is deleted again, not pinned to the inherited value."""
    owner = PROCESS_EXECUTE_SAVE.holder()
    inherited = PatchPoint(PROCESS_EXECUTE_SAVE.module, "__repr__", owner=PROCESS_EXECUTE_SAVE.owner)
    assert "__repr__" not in vars(owner)
    restore = inherited.replace(lambda self: "patched")
    assert repr(owner.__new__(owner)) == "patched"
    restore()
    assert "__repr__" not in vars(owner)
