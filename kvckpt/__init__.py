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
    InvalidCheckpointIdError,
    KVCheckpointError,
    MissingDependencyError,
    StoreFullError,
    StoreUnavailableError,
    UnsafeStoreConfigError,
)
from kvckpt.manage import (
    CheckpointInfo,
    Entry,
    VerifyResult,
    delete,
    info,
    keep_last,
    latest,
    list_checkpoints,
    verify,
)
from kvckpt.registry import open_store, register_backend
from kvckpt.store import Capabilities, KVStore, RangeRead

if TYPE_CHECKING:
    from kvckpt.dcp.api import SafeLoadPlanner, load, save
    from kvckpt.dcp.copy import CopyResult, copy
    from kvckpt.dcp.reader import KVStorageReader
    from kvckpt.dcp.writer import KVStorageWriter

__version__ = "0.1.0"

_LAZY = {
    "KVStorageWriter": "kvckpt.dcp.writer",
    "KVStorageReader": "kvckpt.dcp.reader",
    "SafeLoadPlanner": "kvckpt.dcp.api",
    "save": "kvckpt.dcp.api",
    "load": "kvckpt.dcp.api",
    "copy": "kvckpt.dcp.copy",
    "CopyResult": "kvckpt.dcp.copy",
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
    "Entry",
    "InvalidCheckpointIdError",
    "KVCheckpointError",
    "KVStorageReader",
    "KVStorageWriter",
    "KVStore",
    "MissingDependencyError",
    "RangeRead",
    "SafeLoadPlanner",
    "StoreFullError",
    "StoreUnavailableError",
    "UnsafeStoreConfigError",
    "VerifyResult",
    "copy",
    "delete",
    "info",
    "keep_last",
    "latest",
    "list_checkpoints",
    "load",
    "open_store",
    "register_backend",
    "save",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvckpt' has no attribute {name!r}")
