"""Loading non-tensor values without running code from the store.

DCP stores a non-tensor value (a step counter, an RNG state, a dict of hyper-parameters) with
``torch.save``, i.e. pickle; loading it with plain pickle runs whatever its ``__reduce__`` names. A
store shared between jobs must not be a way to run code in the loading process, so kvckpt checks
every such value with ``torch.load(weights_only=True)`` (a restricted unpickler that constructs only
allow-listed classes) before any planner sees it, unless ``allow_pickle=True`` is given.
"""

from __future__ import annotations

import io
import pickle
import re
import threading
import warnings
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

from kvckpt.errors import PickleLoadWarning, UnsafeObjectError
from kvckpt.humanize import printable
from kvckpt.integrations.torch_private import set_element

_GLOBAL = re.compile(r"GLOBAL (\S+)")
_warned = threading.Event()


def load_safely(fqn: str, data: io.BytesIO) -> Any:
    """``torch.load(weights_only=True)``; UnsafeObjectError naming the refused class otherwise.

    A ``BytesIO`` value (DCP stores it pickled) is data, not code, so it is allowed: state such as a
    train loop's loss history travels that way, and ``dcp.load`` from a folder loads it.
    """
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            return torch.load(data, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        refused = printable(found.group(1).rstrip(".,;") if found else str(exc).splitlines()[0])
        raise UnsafeObjectError(
            f"{printable(fqn)!r}: the stored object needs {refused}, which a safe load does not "
            "construct (weights_only=True); pass allow_pickle=True only if you trust whoever wrote "
            "this store",
            fqn=fqn,
            refused=refused,
        ) from None


def warn_unrestricted_once() -> None:
    if _warned.is_set():
        return
    _warned.set()
    warnings.warn(
        "dcp.load with KVStorageReader unpickles non-tensor values from the store without "
        "restriction, which can run code: load with kvckpt.load(state_dict, checkpoint_id) or "
        "planner=kvckpt.SafeLoadPlanner(); KVStorageReader(..., allow_pickle=True) says you trust "
        "the store and silences this",
        PickleLoadWarning,
        stacklevel=4,
    )


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose BYTE_IO items load with ``torch.load(weights_only=True)``.

    DCP's own planner unpickles arbitrary objects; a store shared between jobs must not be a way to
    run code in the loading process. ``allow_pickle=True`` restores DCP's behaviour.
    """

    def __init__(self, *args: Any, allow_pickle: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_pickle = allow_pickle

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = torch.load(value, weights_only=False) if self.allow_pickle else load_safely(fqn, value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def is_safe(planner: LoadPlanner) -> bool:
    """The planner itself refuses what a safe load refuses."""
    return isinstance(planner, SafeLoadPlanner) and not planner.allow_pickle


def hand_over(planner: LoadPlanner, read_item: ReadItem, data: bytes, allow_pickle: bool | None) -> None:
    """Give a stored non-tensor value to the planner, refusing unsafe ones unless pickle is allowed.

    ``allow_pickle=None`` (a reader made for plain ``dcp.load``) keeps DCP's behaviour but warns once.
    """
    if not is_safe(planner):
        if allow_pickle is None:
            warn_unrestricted_once()
        elif not allow_pickle:
            load_safely(read_item.dest_index.fqn, io.BytesIO(data))
    planner.load_bytes(read_item, io.BytesIO(data))
