"""Where a scenario's checkpoints go: a DCP folder (the reference) or a kvckpt store.

Each scenario runs once on DCP's stock FileSystemWriter/Reader in a temporary folder and once on
kvckpt, through the same DCP calls, so a difference is kvckpt's. A Place is picklable when it names
its store by URL, so multi-rank scenarios hand it to spawned ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from kvckpt.dcp.reader import KVStorageReader
from kvckpt.dcp.writer import KVStorageWriter


class Place:
    """Checkpoint ids under one root, and writers/readers for them."""

    def __init__(self, name: str, root: str, options: dict[str, Any] | None = None) -> None:
        self.name, self.root, self.options = name, root, options or {}

    @property
    def is_folder(self) -> bool:
        return self.name == "folder"

    def id(self, checkpoint: str) -> str:
        """The checkpoint_id DCP passes to ``reset``: a path, a URL, or a bare namespace."""
        if self.is_folder:
            return str(Path(self.root) / checkpoint)
        return f"{self.root}/{checkpoint}"

    def writer(self, checkpoint: str | None = None, *, overwrite: bool = False, **kw: Any) -> StorageWriter:
        """A writer; without ``checkpoint``, one that DCP must point somewhere with checkpoint_id."""
        if self.is_folder:  # FileSystemWriter needs a path up front; DCP's reset() replaces it
            return FileSystemWriter(self.id(checkpoint or "unset"), overwrite=overwrite, **kw)
        target = None if checkpoint is None else self.id(checkpoint)
        return KVStorageWriter(target, overwrite=overwrite, **self.options, **kw)

    def reader(self, checkpoint: str | None = None) -> StorageReader:
        if self.is_folder:
            return FileSystemReader(self.id(checkpoint or "unset"))
        return KVStorageReader(None if checkpoint is None else self.id(checkpoint), **self.options)

    def __repr__(self) -> str:
        return f"Place({self.name})"


def folder(path: Path) -> Place:
    return Place("folder", str(path))


def store(name: str, root: str, options: dict[str, Any] | None = None) -> Place:
    """A kvckpt store: ``root`` is a URL, or a bare namespace when ``options`` inject a client."""
    return Place(name, root, options)
