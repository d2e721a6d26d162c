"""Let DCP resolve kvckpt URLs itself: ``dcp.save(sd, checkpoint_id="redis://…")`` after ``install()``.

DCP picks a storage for a bare ``checkpoint_id`` in ``_storage_utils._storage_setup``, trying only
FileSystemWriter/Reader and FsspecWriter/Reader; there is no registry for third parties. ``install``
puts a wrapper in front of that function (in every DCP module that imported it by name) which
answers for the schemes kvckpt serves and hands anything else to DCP unchanged. It runs before
DCP's own list, so an fsspec protocol registered for ``redis://`` (see ``install``) can never route
a save through FsspecWriter's file format.

A reader made here loads non-tensor values with ``weights_only=True`` whatever the planner, as
``kvckpt.load`` does, unless the planner is ``SafeLoadPlanner(allow_pickle=True)``.

``async_save(..., async_checkpointer_type=PROCESS)`` runs ``save`` in a spawned process that never
ran ``install``; for it the writer is built here, in the caller, and DCP pickles it across (stores
pickle without their sockets and reconnect in the child).

``uninstall`` puts back everything ``install`` replaced. The patched names are torch's private ones,
found through kvckpt.integrations.torch_private.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter
from torch.futures import Future

from kvckpt.dcp.reader import KVStorageReader
from kvckpt.dcp.safe_load import SafeLoadPlanner
from kvckpt.dcp.writer import KVStorageWriter
from kvckpt.integrations.torch_private import PROCESS_EXECUTE_SAVE, STORAGE_SETUP
from kvckpt.registry import owns
from kvckpt.target import checkpoint_text

_lock = threading.Lock()
#: What uninstall() runs to put back each thing install() replaced; empty while not installed.
_undo: list[Callable[[], None]] = []
#: DCP's own functions, found by install(); the wrappers hand everything not kvckpt's to them.
_original: dict[str, Any] = {}


class URLStorageReader(KVStorageReader):
    """The reader ``dcp.load(checkpoint_id=URL)`` gets: non-tensor values load safely, as with
    ``kvckpt.load``, unless the planner is ``SafeLoadPlanner(allow_pickle=True)``: the caller's own
    statement that it trusts the store."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self.allow_pickle = isinstance(planner, SafeLoadPlanner) and planner.allow_pickle
        return super().read_data(plan, planner)


def _storage_setup(
    storage: StorageReader | StorageWriter | None,
    checkpoint_id: str | os.PathLike[str] | None,
    reader: bool = False,
) -> StorageReader | StorageWriter | None:
    """DCP's storage choice, with kvckpt's writer/reader for kvckpt's URL schemes, however given
    (a str, or a PathLike whose text is one; a URL pathlib has collapsed is refused)."""
    text = checkpoint_text(checkpoint_id)
    if storage is None and owns(text):
        assert isinstance(text, str)
        return URLStorageReader(text) if reader else KVStorageWriter(text)
    chosen: StorageReader | StorageWriter | None = _original["setup"](storage, checkpoint_id, reader=reader)
    return chosen


def _execute_save(self: Any, staged: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the writer in the caller, so the checkpoint process needs no hook of its own."""
    checkpoint_id = checkpoint_text(kwargs.get("checkpoint_id"))
    if kwargs.get("storage_writer") is None and owns(checkpoint_id):
        assert isinstance(checkpoint_id, str)
        kwargs["storage_writer"] = KVStorageWriter(checkpoint_id)
        kwargs["checkpoint_id"] = checkpoint_id  # the text crosses to the process, not the caller's object
    return _original["execute"](self, staged, *args, **kwargs)


def installed() -> bool:
    return all(point.get() is _storage_setup for point in STORAGE_SETUP)


def install() -> None:
    """Make ``dcp.save/load/async_save`` take kvckpt URLs as ``checkpoint_id``; idempotent.

    Also registers kvckpt's directory view with fsspec for the same schemes, so frameworks that list,
    probe and delete checkpoint folders through fsspec (Lightning's ModelCheckpoint, torchtitan's
    CheckpointManager) see committed checkpoints. Call it once per process, before the first save.
    UnsupportedTorchError, with nothing changed, when the installed torch lacks a function it patches.
    """
    from kvckpt.integrations.fsview import register_fsspec

    with _lock:
        if _undo:
            return
        # Every target is looked up before the first is replaced: a torch lacking one changes nothing.
        found = [point.get() for point in (*STORAGE_SETUP, PROCESS_EXECUTE_SAVE)]
        _original.update(setup=found[0], execute=found[-1])
        _undo.extend(point.replace(_storage_setup) for point in STORAGE_SETUP)
        _undo.append(PROCESS_EXECUTE_SAVE.replace(_execute_save))
        _undo.append(register_fsspec())


def uninstall() -> None:
    """Undo ``install()``: DCP's functions and fsspec's registrations for kvckpt's schemes are what
    they were before it, so a kvckpt URL reaches DCP's own storage choice again; idempotent, and
    ``install()`` works again after it."""
    with _lock:
        while _undo:
            _undo.pop()()
