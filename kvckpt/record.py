"""The commit record: its msgpack envelope (versioned, no pickle) and its typed item rows.

Torch-free, so the management API reads records without importing torch. Tuples survive the round
trip (DCP's planner_data maps fqns to tuple paths) as msgpack extension type 1. Lengths in a hostile
record cannot allocate more than the record's own size (msgpack bounds every container and string by
the input length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from kvckpt.errors import CorruptCheckpointError, KVCheckpointError
from kvckpt.gcpause import paused_gc
from kvckpt.layout import StoredChunk

FORMAT = "kvckpt"
#: The newest record version. A record is written as version 2 only when it needs to be: when a
#: chunk starts past the beginning of its value (a pack of small items), which a reader of version 1
#: would read from the value's start. Every other record is version 1, byte for byte as before.
VERSION = 2
VERSIONS = (1, 2)
#: Where a chunk may end at most: Redis takes range ends as signed 64-bit integers.
_MAX_END = (1 << 63) - 1
_TUPLE = 1


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return msgpack.ExtType(_TUPLE, pack(list(obj)))
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    raise KVCheckpointError(
        f"cannot store a {type(obj).__qualname__} in a kvckpt record: records hold only plain values "
        "(None, bool, int, float, str, bytes, list, tuple, dict) so loading never runs code"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(_unpackb(data))
    raise ValueError(f"unknown msgpack extension type {code}")


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    """The value ``data`` holds; the collector is paused meanwhile (kvckpt.gcpause): a 10,000-item
    record is ~10^5 acyclic objects, enough to trigger full collections of a training process."""
    with paused_gc():
        return _unpackb(data)


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode_record(body: dict[str, Any]) -> bytes:
    packed = any(len(chunk) > 3 for row in body.get("items", ()) for chunk in row[5])
    return pack({"format": FORMAT, "version": VERSION if packed else 1, **body})


def decode_record(data: bytes, key: str) -> dict[str, Any]:
    """The record's body; CorruptCheckpointError naming ``key`` for anything that is not one."""
    try:
        record = unpack(data)
    except Exception as exc:  # msgpack raises many types on garbage; all mean "not a record"
        raise CorruptCheckpointError(
            f"{key}: the record is not valid msgpack ({type(exc).__name__}); the checkpoint is "
            "damaged or was not written by kvckpt",
            key=key,
        ) from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{key}: this value is not a kvckpt record", key=key)
    version = record.get("version")
    if type(version) is not int or version not in VERSIONS:
        raise CorruptCheckpointError(
            f"{key}: record version {version!r:.40} is not supported by this kvckpt (reads versions "
            f"{', '.join(map(str, VERSIONS))}); upgrade kvckpt to load it",
            key=key,
        )
    return record


@dataclass(frozen=True)
class RecordItem:
    """One stored DCP write item as the record lists it (docs/record-format.md).

    On the wire it is the row ``[fqn, offset, nbytes, dtype, shape, [[key, nbytes, sums], ...]]``;
    ``offset`` is the DCP MetadataIndex offset, ``dtype``/``shape`` are None for BYTE_IO items. A
    chunk that starts inside its value (in a pack) has a fourth field, where it starts.
    """

    fqn: str
    offset: tuple[int, ...] | None
    nbytes: int
    dtype: str | None
    shape: tuple[int, ...] | None
    chunks: tuple[StoredChunk, ...]

    def to_row(self) -> list[Any]:
        return [
            self.fqn,
            None if self.offset is None else list(self.offset),
            self.nbytes,
            self.dtype,
            None if self.shape is None else list(self.shape),
            [_chunk_row(c) for c in self.chunks],
        ]

    @classmethod
    def from_row(cls, row: Any) -> RecordItem:
        """The item a row describes; ValueError saying what is wrong with a malformed one."""
        if not isinstance(row, list) or len(row) != 6:
            raise ValueError(f"an item row is {type(row).__name__} of {_len(row)} fields, not 6")
        fqn, offset, nbytes, dtype, shape, chunks = row
        if not isinstance(fqn, str) or not _count(nbytes):
            raise ValueError(f"bad item row {row[:3]!r:.200}")
        if dtype is not None and not isinstance(dtype, str):
            raise ValueError(f"bad dtype {dtype!r:.60} for {fqn!r}")
        if not isinstance(chunks, list):
            raise ValueError(f"bad chunk list for {fqn!r}")
        try:
            stored = tuple(map(_chunk, chunks))
        except ValueError as exc:
            raise ValueError(f"{fqn!r}: {exc}") from None
        item = cls(fqn, _sizes(offset), nbytes, dtype, _sizes(shape), stored)
        if sum(c.nbytes for c in item.chunks) != nbytes:
            raise ValueError(f"chunk sizes of {fqn!r} do not add up to {nbytes}")
        return item


def _len(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _sizes(values: Any) -> tuple[int, ...] | None:
    if values is None:
        return None
    if not isinstance(values, list) or not all(map(_count, values)):
        raise ValueError(f"bad size {values!r:.60}")
    return tuple(values)


def _chunk_row(chunk: StoredChunk) -> list[Any]:
    """The offset only where there is one, so a record without packs is what it always was."""
    row = [chunk.key, chunk.nbytes, list(chunk.sums)]
    return [*row, chunk.offset] if chunk.offset else row


def _chunk(row: Any) -> StoredChunk:
    if not isinstance(row, list) or len(row) not in (3, 4):
        raise ValueError(f"bad chunk {row!r:.200}")
    key, size, sums, offset = row if len(row) == 4 else [*row, 0]
    if not isinstance(key, str) or not _count(size):
        raise ValueError(f"bad chunk {row!r:.200}")
    if not _count(offset) or offset + size > _MAX_END:
        raise ValueError(f"chunk {key!r} has a bad offset {offset!r:.40} (for {size} bytes)")
    if not isinstance(sums, list) or not all(type(s) is int and 0 <= s < 2**64 for s in sums):
        raise ValueError(f"bad checksums for chunk {key!r}")
    return StoredChunk(key=key, nbytes=size, sums=tuple(sums), offset=offset)


def decode_items(body: dict[str, Any], key: str) -> list[RecordItem]:
    """The record's items; CorruptCheckpointError naming ``key`` when any row is malformed."""
    try:
        rows = body["items"]
        if not isinstance(rows, list):
            raise TypeError("'items' is not a list")
        with paused_gc():  # one object per item and chunk (kvckpt.gcpause)
            return [RecordItem.from_row(row) for row in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{key}: the record's item list is malformed ({exc})", key=key) from exc


def chunk_keys(body: dict[str, Any], key: str = "") -> list[str]:
    """Every data key (relative to the namespace) a decoded record refers to, each once (the chunks
    of a pack share its key)."""
    items = decode_items(body, key or "record")
    return list(dict.fromkeys(chunk.key for item in items for chunk in item.chunks))
