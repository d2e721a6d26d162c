"""kvckpt: PyTorch Distributed Checkpoint storage in Redis, Redis Cluster and etcd.

    dcp.save(state_dict, storage_writer=kvckpt.KVStorageWriter("redis://localhost:6379/0/run1/step100"))
    dcp.load(state_dict, storage_reader=kvckpt.KVStorageReader("redis://localhost:6379/0/run1/step100"))

torch-dependent names load on first use, so the store layer and the CLI start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvckpt.errors import (
    CheckpointChangedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointTooLargeError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidCheckpointIdError,
    InvalidStoreOptionError,
    KVCheckpointError,
    MissingDependencyError,
    PickleLoadWarning,
    ReplicationError,
    StateDictMismatchError,
    StoreFullError,
    StoreProtocolError,
    StoreUnavailableError,
    UnloadedEntriesError,
    UnloadedEntriesWarning,
    UnpicklableValueError,
    UnsafeObjectError,
    UnsafeStoreConfigError,
    UnsafeStoreConfigWarning,
    UnsupportedTorchError,
)
from kvckpt.management.api import (
    CheckpointInfo,
    Entry,
    VerifyResult,
    delete,
    gc,
    info,
    keep_last,
    latest,
    list_checkpoints,
    list_orphans,
    verify,
)
from kvckpt.management.orphans import Orphan
from kvckpt.registry import open_store, register_backend
from kvckpt.store import Capabilities, KVStore, RangeRead
from kvckpt.tiered.tiers import DrainedCheckpoint, durable_checkpoints, newest_restorable

if TYPE_CHECKING:
    from kvckpt.dcp.api import load, save
    from kvckpt.dcp.reader import KVStorageReader
    from kvckpt.dcp.safe_load import SafeLoadPlanner
    from kvckpt.dcp.writer import KVStorageWriter
    from kvckpt.integrations.hook import install, uninstall
    from kvckpt.tiered.copy import CopyResult, copy
    from kvckpt.tiered.drain import Drained, Drainer

__version__ = "0.1.0"

_LAZY = {
    "KVStorageWriter": "kvckpt.dcp.writer",
    "KVStorageReader": "kvckpt.dcp.reader",
    "SafeLoadPlanner": "kvckpt.dcp.safe_load",
    "save": "kvckpt.dcp.api",
    "load": "kvckpt.dcp.api",
    "copy": "kvckpt.tiered.copy",
    "CopyResult": "kvckpt.tiered.copy",
    "install": "kvckpt.integrations.hook",
    "uninstall": "kvckpt.integrations.hook",
    "Drainer": "kvckpt.tiered.drain",
    "Drained": "kvckpt.tiered.drain",
}

__all__ = [
    "Capabilities",
    "CheckpointChangedError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointTooLargeError",
    "CopyResult",
    "CorruptCheckpointError",
    "Drained",
    "DrainedCheckpoint",
    "Drainer",
    "Entry",
    "InvalidArgumentError",
    "InvalidCheckpointIdError",
    "InvalidStoreOptionError",
    "KVCheckpointError",
    "KVStorageReader",
    "KVStorageWriter",
    "KVStore",
    "MissingDependencyError",
    "Orphan",
    "PickleLoadWarning",
    "RangeRead",
    "ReplicationError",
    "SafeLoadPlanner",
    "StateDictMismatchError",
    "StoreFullError",
    "StoreProtocolError",
    "StoreUnavailableError",
    "UnloadedEntriesError",
    "UnloadedEntriesWarning",
    "UnpicklableValueError",
    "UnsafeObjectError",
    "UnsafeStoreConfigError",
    "UnsafeStoreConfigWarning",
    "UnsupportedTorchError",
    "VerifyResult",
    "copy",
    "delete",
    "durable_checkpoints",
    "gc",
    "info",
    "install",
    "keep_last",
    "latest",
    "list_checkpoints",
    "list_orphans",
    "load",
    "newest_restorable",
    "open_store",
    "register_backend",
    "save",
    "uninstall",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvckpt' has no attribute {name!r}")
