"""Copy a checkpoint between any two of: kvckpt URLs (Redis, Cluster, etcd) and DCP folders.

Both ends are driven through DCP's own StorageReader/StorageWriter calls, item by item:
- a folder is read by stock ``FileSystemReader`` and written by stock ``FileSystemWriter``, so what
  DCP wrote imports, and what kvckpt exports is a plain DCP checkpoint;
- kvckpt's reader verifies checksums on the way out; its writer re-chunks for the destination's value
  limit, computes fresh checksums and commits atomically under a new generation;
- at most ``group_bytes`` of source data is held at once, never the whole state dict: a tensor larger
  than a quarter of it is copied from a store as dim-0 slices (a folder source holds one stored item);
- non-tensor values travel as the bytes DCP stored: nothing is unpickled. (Reading a folder's
  ``.metadata`` is DCP's own pickle load, as in ``dcp.load``: import only folders you trust.)
- a copy keeps its source's step and commit time, into a folder as a JSON sidecar (kvckpt.tiered.origin)
  that a copy out of that folder reads back.
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
from typing import Any, TypeGuard, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
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
from kvckpt.integrations.torch_private import fsspec_reader
from kvckpt.registry import owns, schemes
from kvckpt.target import checkpoint_text
from kvckpt.tiered import origin
from kvckpt.tiered.tiers import open_fsspec
from kvckpt.urls import redact, scheme_of

METADATA_FILE = origin.METADATA_FILE
#: Source bytes a copy holds at once by default.
DEFAULT_GROUP_BYTES = 64 << 20


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


@dataclass(frozen=True)
class CopyPlan:
    """What a copy writes, in groups of at most ``group_bytes`` (one item may exceed it alone)."""

    groups: list[list[_Item]]
    metadata: Metadata  # the destination's, before its writer adds storage_data
    nbytes: int

    @property
    def items(self) -> int:
        return sum(len(group) for group in self.groups)


def _blob(fqn: str, metadata: Metadata) -> _Item:
    index = MetadataIndex(fqn)
    stored = (metadata.storage_data or {}).get(index)
    size = int(getattr(stored, "nbytes", None) or getattr(stored, "length", 0) or 0)
    zero = torch.Size([0])
    read = ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, torch.Size([size]))
    return _Item(WriteItem(index, WriteItemType.BYTE_IO), read, None, size)


def _pieces(chunk: ChunkStorageMetadata, element: int, piece_bytes: int | None) -> list[tuple[int, int]]:
    """(first row, rows) of each piece a stored chunk is copied as: whole, or dim-0 slices."""
    rows = chunk.sizes[0] if len(chunk.sizes) else 1
    nbytes = chunk.sizes.numel() * element
    if piece_bytes is None or nbytes <= piece_bytes or rows <= 1:
        return [(0, rows)]
    step = max(1, piece_bytes // (nbytes // rows))
    return [(start, min(step, rows - start)) for start in range(0, rows, step)]


def plan_copy(metadata: Metadata, *, group_bytes: int, piece_bytes: int | None) -> CopyPlan:
    """One write item per stored piece, non-tensor values first (FileSystemWriter asks for them first).

    With ``piece_bytes`` a stored tensor chunk larger than that is copied as dim-0 slices, each its
    own chunk in the destination (as a sharded save stores it), so memory stays bounded by the group
    size whatever the size of one tensor; a source that reads a slice without the rest (a kvckpt
    store) is asked for exactly those bytes.
    """
    if group_bytes < 1:
        raise KVCheckpointError(f"group_bytes must be at least 1 byte, got {group_bytes!r}")
    blobs, tensors = [], []
    state: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            blobs.append(_blob(fqn, metadata))
            state[fqn] = meta
            continue
        element = torch.empty((), dtype=meta.properties.dtype).element_size()
        chunks = []
        for chunk in meta.chunks:
            source = MetadataIndex(fqn, chunk.offsets)
            for first, rows in _pieces(chunk, element, piece_bytes):
                sizes = torch.Size([rows, *chunk.sizes[1:]]) if len(chunk.sizes) else chunk.sizes
                offsets = chunk.offsets
                if first:
                    offsets = torch.Size([offsets[0] + first, *offsets[1:]])
                piece = ChunkStorageMetadata(offsets, sizes)
                chunks.append(piece)
                index = MetadataIndex(fqn, offsets)
                data = TensorWriteData(chunk=piece, properties=meta.properties, size=meta.size)
                kind = WriteItemType.TENSOR if sizes == meta.size else WriteItemType.SHARD
                within = torch.Size([first] + [0] * (len(sizes) - 1)) if len(sizes) else sizes
                zeros = torch.Size([0] * len(sizes))
                read = ReadItem(
                    LoadItemType.TENSOR,
                    dest_index=index,
                    dest_offsets=zeros,
                    storage_index=source,
                    storage_offsets=within,
                    lengths=sizes,
                )
                write = WriteItem(index, kind, tensor_data=data)
                tensors.append(_Item(write, read, meta.properties.dtype, sizes.numel() * element))
        state[fqn] = TensorStorageMetadata(meta.properties, meta.size, chunks)
    groups: list[list[_Item]] = [[]]
    size = 0
    for item in blobs + tensors:
        if groups[-1] and size + item.nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    copied = Metadata(state_dict_metadata=state, planner_data=metadata.planner_data, version=metadata.version)
    return CopyPlan([g for g in groups if g], copied, sum(i.nbytes for i in blobs + tensors))


class _Feed:
    """The destination's SavePlanner and the source's LoadPlanner at once (only what they call).

    The first item the writer asks for from a group reads the whole group from the source in one
    ``read_data`` call (the source batches its I/O); each item is dropped once handed over, so at
    most one group is held, in whatever order the writer asks.
    """

    def __init__(self, reader: StorageReader, plan: CopyPlan, progress: Callable[[int], None] | None) -> None:
        self._reader, self._progress = reader, progress
        self._group_of = {item.write.index: group for group in plan.groups for item in group}
        self._size = {item.write.index: item.nbytes for group in plan.groups for item in group}
        self._dtype = {item.write.index: item.dtype for group in plan.groups for item in group}
        self._ready: dict[MetadataIndex, torch.Tensor | io.BytesIO] = {}
        self._done: set[MetadataIndex] = set()

    # SavePlanner side
    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        index = write_item.index
        if index not in self._ready:
            self._ready.clear()  # whatever is left of another group was not asked for: never hold two
            wanted = [i.read for i in self._group_of[index] if i.write.index not in self._done]
            self._reader.read_data(LoadPlan(wanted), cast(LoadPlanner, self)).wait()
        data = self._ready.pop(index)
        self._done.add(index)
        if self._progress is not None:
            self._progress(self._size[index])
        return data

    # LoadPlanner side
    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        tensor = torch.empty(read_item.lengths, dtype=self._dtype[read_item.dest_index])
        self._ready[read_item.dest_index] = tensor
        return tensor

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out the tensor the data lands in

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self._ready[read_item.dest_index] = value


def _folder(location: str | os.PathLike[str], role: str) -> Path:
    scheme = scheme_of(location)
    if scheme is not None and scheme not in schemes():
        raise InvalidCheckpointIdError(
            f"cannot copy {role} {redact(str(location))!r}: kvckpt copies between kvckpt URLs "
            f"({', '.join(schemes())}) and local DCP folders"
        )
    return Path(location)


def open_source(src: str | os.PathLike[str], store_options: dict[str, Any] | None) -> StorageReader:
    if owns(src):
        # allow_pickle=True is truthful here: the copy's planner keeps each non-tensor value as the
        # bytes DCP stored and never unpickles it, so there is nothing to restrict or warn about.
        return KVStorageReader(src, store_options=store_options, allow_pickle=True)
    path = _folder(src, "from")
    if not (path / METADATA_FILE).is_file():
        raise CheckpointNotFoundError(
            f"{path}: not a DCP checkpoint folder (no {METADATA_FILE} in it); give the folder that "
            "dcp.save(checkpoint_id=...) wrote",
            checkpoint_id=str(path),
        )
    return FileSystemReader(path)


def durable_reader(
    location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> StorageReader:
    """A stock DCP reader for a checkpoint folder (FileSystemReader) or fsspec URL (FsspecReader).

    A location without DCP's ``.metadata`` is CheckpointNotFoundError here, not DCP's error later.
    """
    text = os.fspath(location)
    fs, path = open_fsspec(text, storage_options)
    if not fs.isfile(f"{path.rstrip('/')}/{METADATA_FILE}"):
        raise CheckpointNotFoundError(
            f"{redact(text)}: not a kvckpt URL, nor a DCP checkpoint (no {METADATA_FILE} in it); give a "
            "store URL, or the folder or fsspec URL that dcp.save or `kvckpt drain` wrote",
            checkpoint_id=redact(text),
        )
    if scheme_of(text) in (None, "file"):
        return FileSystemReader(path)
    return fsspec_reader()(text, **(storage_options or {}))


def read_metadata(reader: StorageReader, src: object) -> Metadata:
    if isinstance(reader, KVStorageReader):
        return reader.read_metadata()
    try:
        return reader.read_metadata()
    except Exception as exc:  # DCP unpickles the file: any failure means it is not a readable checkpoint
        raise CorruptCheckpointError(
            f"{src}/{METADATA_FILE} cannot be read as DCP metadata ({type(exc).__name__}: {exc})"
        ) from exc


@contextlib.contextmanager
def folder_destination(path: Path, overwrite: bool) -> Iterator[Path]:
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
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the copy is the user's folder
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
    group_bytes: int = DEFAULT_GROUP_BYTES,
) -> CopyResult:
    """Copy the committed checkpoint ``src`` to ``dst``; each is a kvckpt URL or a DCP folder.

    ``overwrite`` replaces a checkpoint already at ``dst`` (atomically in a store; in a folder by
    moving the finished copy into place). ``ttl`` expires a copy in a store. ``progress`` is called with
    the bytes of each item as it is handed to the destination. ``store_options`` go to both stores.
    ``group_bytes`` bounds the source data held at once (see :func:`plan_copy`).
    """
    src, dst = checkpoint_text(src), checkpoint_text(dst)  # a Path("redis://…") is refused, not a folder
    if ttl is not None and not owns(dst):
        raise KVCheckpointError("ttl= applies to a copy into a kvckpt store, not into a folder")
    reader = open_source(src, store_options)
    metadata = read_metadata(reader, src)
    plan = plan_for(reader, metadata, group_bytes)
    source = str(reader.checkpoint_id) if isinstance(reader, KVStorageReader) else str(src)
    found = _origin(reader, src)
    if owns(dst):
        writer = KVStorageWriter(dst, overwrite=overwrite, ttl=ttl, store_options=store_options)
        if found is not None:
            writer.step = found.step
            writer.source_order = (found.created, _source_clock(reader, writer))
        destination = str(writer.checkpoint_id)
        write_copy(reader, plan, writer, progress)
    else:
        path = _folder(dst, "to")
        destination = str(path)
        with folder_destination(path, overwrite) as staging:
            write_copy(reader, plan, StagedFolderWriter(staging, path), progress)
            if found is not None:
                origin.write(staging, found)
    return CopyResult(source, destination, plan.items, plan.nbytes)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _origin(reader: StorageReader, src: str | os.PathLike[str]) -> origin.Origin | None:
    """The source's step and commit time: a copy keeps them, so latest() and keep_last order it as
    its source. A folder says them in the drainer's marker or a copy's sidecar (kvckpt.tiered.origin)."""
    if not isinstance(reader, KVStorageReader):
        return origin.read(Path(src))
    body = reader.record_body
    created, step, clock = body.get("created"), body.get("step"), body.get("commit_clock")
    if not _is_number(created):
        return None
    return origin.Origin(
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        created=float(created),
        commit_clock=float(clock) if _is_number(clock) else None,
        source=reader.target.display,
        namespace=reader.target.namespace,
        save_id=str(body.get("save_id", "")),
    )


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _source_clock(reader: StorageReader, writer: KVStorageWriter) -> float | None:
    """The source's commit clock, kept by a copy within the same store. A copy from a folder or
    another store records none: the clock it carries is another store's (or this one's before it was
    lost: an etcd revision starts again), so it sorts before every checkpoint committed here with this
    store's clock, after those its step says it follows (docs/record-format.md, "Order")."""
    if not isinstance(reader, KVStorageReader):
        return None
    clock = reader.record_body.get("commit_clock")
    source, destination = reader.target.store, writer.target.store
    same = type(source) is type(destination) and repr(source) == repr(destination)
    return float(clock) if same and _is_number(clock) else None


def plan_for(reader: StorageReader, metadata: Metadata, group_bytes: int) -> CopyPlan:
    """Set ``reader`` up and plan the copy; only a store source reads a slice of a tensor alone."""
    reader.set_up_storage_reader(metadata, True)
    pieces = max(1, group_bytes // 4) if isinstance(reader, KVStorageReader) else None
    return plan_copy(metadata, group_bytes=group_bytes, piece_bytes=pieces)


class StagedFolderWriter(FileSystemWriter):
    """Writes into the staging folder but records the folder it will be moved to."""

    def __init__(self, staging: Path, final: Path) -> None:
        super().__init__(staging, overwrite=False)
        self._final = final

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self._final), save_id=self.save_id)


def write_copy(
    reader: StorageReader, plan: CopyPlan, writer: StorageWriter, progress: Callable[[int], None] | None
) -> None:
    """The calls dcp.save makes, without a state dict to plan from.

    A folder writer (FileSystemWriter, FsspecWriter) keeps every tensor of a file until the file is
    closed, so it gets one write plan, hence one file, per group, as if each group came from its own
    rank; a kvckpt store writes item by item and gets one plan.
    """
    feed = cast(SavePlanner, _Feed(reader, plan, progress))
    writer.set_up_storage_writer(True)
    if isinstance(writer, FileSystemWriter):
        plans = [SavePlan([item.write for item in group]) for group in plan.groups] or [SavePlan([])]
    else:
        plans = [SavePlan([item.write for group in plan.groups for item in group])]
    plans = writer.prepare_global_plan([writer.prepare_local_plan(p) for p in plans])
    results = [writer.write_data(p, feed).wait() for p in plans]
    writer.finish(plan.metadata, results)
