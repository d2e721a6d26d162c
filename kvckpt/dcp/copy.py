"""Copy a checkpoint between any two of: kvckpt URLs (Redis, Cluster, etcd) and DCP folders.

Both ends are driven through DCP's own StorageReader/StorageWriter calls, item by item:
- a folder is read by stock ``FileSystemReader`` and written by stock ``FileSystemWriter``, so what
  DCP wrote imports, and what kvckpt exports is a plain DCP checkpoint;
- kvckpt's reader verifies checksums on the way out; its writer re-chunks for the destination's value
  limit, computes fresh checksums and commits atomically under a new generation;
- at most ``group_bytes`` of source data (plus one item) is held at once, never the whole state dict;
- non-tensor values travel as the bytes DCP stored: nothing is unpickled. (Reading a folder's
  ``.metadata`` is DCP's own pickle load, as in ``dcp.load``: import only folders you trust.)
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from kvckpt.dcp.reader import KVStorageReader
from kvckpt.dcp.writer import KVStorageWriter
from kvckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidCheckpointIdError,
    KVCheckpointError,
)
from kvckpt.registry import owns, schemes
from kvckpt.urls import redact, scheme_of

METADATA_FILE = ".metadata"


@dataclass(frozen=True)
class CopyResult:
    source: str  # credentials redacted
    destination: str
    items: int
    nbytes: int


@dataclass(frozen=True)
class _Item:
    write: WriteItem
    read: ReadItem
    dtype: torch.dtype | None  # None for BYTE_IO
    nbytes: int


def _items(metadata: Metadata) -> list[_Item]:
    """One item per stored piece, non-tensor values first (FileSystemWriter asks for them first)."""
    blobs, tensors = [], []
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            index = MetadataIndex(fqn)
            stored = (metadata.storage_data or {}).get(index)
            size = int(getattr(stored, "nbytes", None) or getattr(stored, "length", 0) or 0)
            zero = torch.Size([0])
            read = ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, torch.Size([size]))
            blobs.append(_Item(WriteItem(index, WriteItemType.BYTE_IO), read, None, size))
            continue
        element = torch.empty((), dtype=meta.properties.dtype).element_size()
        for chunk in meta.chunks:
            index = MetadataIndex(fqn, chunk.offsets)
            whole = chunk.sizes == meta.size
            data = TensorWriteData(
                chunk=ChunkStorageMetadata(chunk.offsets, chunk.sizes),
                properties=meta.properties,
                size=meta.size,
            )
            write = WriteItem(index, WriteItemType.TENSOR if whole else WriteItemType.SHARD, tensor_data=data)
            zeros = torch.Size([0] * len(chunk.sizes))
            read = ReadItem(LoadItemType.TENSOR, index, zeros, index, zeros, chunk.sizes)
            tensors.append(_Item(write, read, meta.properties.dtype, chunk.sizes.numel() * element))
    return blobs + tensors


class _Feed:
    """The destination's SavePlanner and the source's LoadPlanner at once (only what they call).

    The writer asks for items in plan order; each miss reads the next ``group_bytes`` of items from
    the source in one ``read_data`` call, so the source batches its I/O without holding everything.
    """

    def __init__(
        self,
        reader: StorageReader,
        items: list[_Item],
        group_bytes: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self._reader, self._items, self._group_bytes, self._progress = reader, items, group_bytes, progress
        self._by_index = {item.write.index: (n, item) for n, item in enumerate(items)}
        self._ready: dict[MetadataIndex, torch.Tensor | io.BytesIO] = {}

    # SavePlanner side
    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        position, item = self._by_index[write_item.index]
        if write_item.index not in self._ready:
            self._read_from(position)
        data = self._ready.pop(write_item.index)
        if self._progress is not None:
            self._progress(item.nbytes)
        return data

    def _read_from(self, start: int) -> None:
        if sum(i.nbytes for _, i in map(self._by_index.__getitem__, self._ready)) > self._group_bytes:
            self._ready.clear()  # asked out of order: drop the read-ahead rather than grow without bound
        group, size = [], 0
        for item in self._items[start:]:
            if item.write.index in self._ready:
                continue
            group.append(item.read)
            size += item.nbytes
            if size >= self._group_bytes:
                break
        self._reader.read_data(LoadPlan(group), cast(LoadPlanner, self)).wait()

    # LoadPlanner side
    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        _, item = self._by_index[read_item.storage_index]
        tensor = torch.empty(read_item.lengths, dtype=item.dtype)
        self._ready[read_item.storage_index] = tensor
        return tensor

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out the tensor the data lands in

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self._ready[read_item.storage_index] = value


def _folder(location: str | os.PathLike[str], role: str) -> Path:
    scheme = scheme_of(location)
    if scheme is not None and scheme not in schemes():
        raise InvalidCheckpointIdError(
            f"cannot copy {role} {redact(str(location))!r}: kvckpt copies between kvckpt URLs "
            f"({', '.join(schemes())}) and local DCP folders"
        )
    return Path(location)


def _open_source(src: str | os.PathLike[str], store_options: dict[str, Any] | None) -> StorageReader:
    if owns(src):
        return KVStorageReader(src, store_options=store_options)
    path = _folder(src, "from")
    if not (path / METADATA_FILE).is_file():
        raise CheckpointNotFoundError(
            f"{path}: not a DCP checkpoint folder (no {METADATA_FILE} in it); give the folder that "
            "dcp.save(checkpoint_id=...) wrote",
            checkpoint_id=str(path),
        )
    return FileSystemReader(path)


def _read_metadata(reader: StorageReader, src: object) -> Metadata:
    if isinstance(reader, KVStorageReader):
        return reader.read_metadata()
    try:
        return reader.read_metadata()
    except Exception as exc:  # DCP unpickles the file: any failure means it is not a readable checkpoint
        raise CorruptCheckpointError(
            f"{src}/{METADATA_FILE} cannot be read as DCP metadata ({type(exc).__name__}: {exc})"
        ) from exc


@contextlib.contextmanager
def _folder_destination(path: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh sibling folder to write into, moved onto ``path`` only once the copy has finished.

    An existing checkpoint is replaced only with ``overwrite``, and then never left half-replaced;
    a folder holding anything but a DCP checkpoint is never replaced.
    """
    if path.exists():
        if not path.is_dir():
            raise CheckpointExistsError(f"{path} exists and is not a folder", checkpoint_id=str(path))
        is_checkpoint = (path / METADATA_FILE).is_file()
        if any(path.iterdir()) and not (overwrite and is_checkpoint):
            hint = "pass overwrite=True (--overwrite) to replace it" if is_checkpoint else "choose another"
            raise CheckpointExistsError(
                f"{path} already holds {'a DCP checkpoint' if is_checkpoint else 'files'}; {hint}",
                checkpoint_id=str(path),
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.kvckpt-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(retired / path.name)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    ttl: float | None = None,
    progress: Callable[[int], None] | None = None,
    store_options: dict[str, Any] | None = None,
    group_bytes: int = 64 << 20,
) -> CopyResult:
    """Copy the committed checkpoint ``src`` to ``dst``; each is a kvckpt URL or a DCP folder.

    ``overwrite`` replaces a checkpoint already at ``dst`` (atomically in a store; in a folder by
    moving the finished copy into place). ``ttl`` expires a copy in a store. ``progress`` is called with
    the bytes of each item as it is handed to the destination. ``store_options`` go to both stores.
    """
    if ttl is not None and not owns(dst):
        raise KVCheckpointError("ttl= applies to a copy into a kvckpt store, not into a folder")
    reader = _open_source(src, store_options)
    metadata = _read_metadata(reader, src)
    reader.set_up_storage_reader(metadata, True)
    items = _items(metadata)
    source = str(reader.checkpoint_id) if isinstance(reader, KVStorageReader) else str(src)
    feed = cast(SavePlanner, _Feed(reader, items, group_bytes, progress))
    copied = Metadata(
        state_dict_metadata=metadata.state_dict_metadata,
        planner_data=metadata.planner_data,
        version=metadata.version,
    )
    plan = SavePlan([item.write for item in items])
    if owns(dst):
        writer = KVStorageWriter(dst, overwrite=overwrite, ttl=ttl, store_options=store_options)
        destination = str(writer.checkpoint_id)
        _write(writer, plan, feed, copied)
    else:
        path = _folder(dst, "to")
        destination = str(path)
        with _folder_destination(path, overwrite) as staging:
            _write(_StagedFolderWriter(staging, path), plan, feed, copied)
    return CopyResult(source, destination, len(items), sum(item.nbytes for item in items))


class _StagedFolderWriter(FileSystemWriter):
    """Writes into the staging folder but records the folder it will be moved to."""

    def __init__(self, staging: Path, final: Path) -> None:
        super().__init__(staging, overwrite=False)
        self._final = final

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self._final), save_id=self.save_id)


def _write(writer: StorageWriter, plan: SavePlan, planner: SavePlanner, metadata: Metadata) -> None:
    """The calls dcp.save makes on a one-rank job, without a state dict to plan from."""
    writer.set_up_storage_writer(True)
    (plan,) = writer.prepare_global_plan([writer.prepare_local_plan(plan)])
    results = writer.write_data(plan, planner).wait()
    writer.finish(metadata, [results])
