"""DCP ``Metadata`` ↔ the plain values stored in the record (see docs/record-format.md).

Every torch type is written by name and read back through an allow-list, so a record can never name
an arbitrary object to construct.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from kvckpt.errors import CorruptCheckpointError
from kvckpt.layout import StoredItem
from kvckpt.record import RecordItem, decode_items
from kvckpt.record import chunk_keys as chunk_keys  # re-exported: the writer imports it from here

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
_LAYOUTS = {str(x).removeprefix("torch."): x for x in (torch.strided, torch.sparse_coo)}
_MEMORY_FORMATS = {
    str(x).removeprefix("torch."): x
    for x in (torch.contiguous_format, torch.channels_last, torch.preserve_format)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lookup(table: dict[str, Any], name: object, what: str) -> Any:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {what} {name!r:.60}")
    return table[name]


# Encoding ------------------------------------------------------------------------------------


def _encode_entry(meta: TensorStorageMetadata | BytesStorageMetadata) -> dict[str, Any]:
    if isinstance(meta, BytesStorageMetadata):
        return {"type": "bytes"}
    props = meta.properties
    return {
        "type": "tensor",
        "dtype": dtype_name(props.dtype),
        "size": list(meta.size),
        "chunks": [[list(c.offsets), list(c.sizes)] for c in meta.chunks],
        "layout": str(props.layout).removeprefix("torch."),
        "requires_grad": bool(props.requires_grad),
        "memory_format": str(props.memory_format).removeprefix("torch."),
        "pin_memory": bool(props.pin_memory),
    }


def _encode_item(index: MetadataIndex, item: StoredItem) -> list[Any]:
    offset = None if index.offset is None else tuple(index.offset)
    return RecordItem(index.fqn, offset, item.nbytes, item.dtype, item.shape, item.chunks).to_row()


def encode_metadata(metadata: Metadata, items: dict[MetadataIndex, StoredItem]) -> dict[str, Any]:
    meta = metadata.storage_meta
    return {
        "dcp_version": metadata.version,
        "state_dict": [[fqn, _encode_entry(m)] for fqn, m in metadata.state_dict_metadata.items()],
        "planner_data": metadata.planner_data,
        "storage_meta": None
        if meta is None
        else {
            "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
            "save_id": meta.save_id,
            "load_id": meta.load_id,
            "modules": list(meta.modules),
        },
        "items": [_encode_item(index, item) for index, item in items.items()],
    }


# Decoding ------------------------------------------------------------------------------------


def _decode_entry(entry: dict[str, Any]) -> TensorStorageMetadata | BytesStorageMetadata:
    if entry["type"] == "bytes":
        return BytesStorageMetadata()
    if entry["type"] != "tensor":
        raise ValueError(f"unknown entry type {entry['type']!r:.60}")
    props = TensorProperties(
        dtype=_lookup(DTYPES, entry["dtype"], "dtype"),
        layout=_lookup(_LAYOUTS, entry["layout"], "layout"),
        requires_grad=bool(entry["requires_grad"]),
        memory_format=_lookup(_MEMORY_FORMATS, entry["memory_format"], "memory format"),
        pin_memory=bool(entry["pin_memory"]),
    )
    chunks = [ChunkStorageMetadata(offsets=_size(o), sizes=_size(s)) for o, s in entry["chunks"]]
    return TensorStorageMetadata(properties=props, size=_size(entry["size"]), chunks=chunks)


def _size(values: Any) -> torch.Size:
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"bad size {values!r:.60}")
    return torch.Size(values)


def _decode_item(item: RecordItem) -> tuple[MetadataIndex, StoredItem]:
    if item.dtype is not None:
        _lookup(DTYPES, item.dtype, "dtype")
    stored = StoredItem(nbytes=item.nbytes, chunks=item.chunks, dtype=item.dtype, shape=item.shape)
    return MetadataIndex(item.fqn, None if item.offset is None else torch.Size(item.offset)), stored


def _check_consistent(
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata], items: dict[MetadataIndex, StoredItem]
) -> None:
    """Every stored item agrees with its state_dict entry, so no read can run outside a tensor.

    This also bounds what a load allocates by the caller's own tensors, whatever a record claims.
    """
    for index, item in items.items():
        fqn, entry = index.fqn, state.get(index.fqn)
        if entry is None:
            raise ValueError(f"stored item {fqn!r} has no state_dict entry")
        if isinstance(entry, BytesStorageMetadata):
            if item.dtype is not None or item.shape is not None or index.offset is not None:
                raise ValueError(f"{fqn!r} is a bytes entry but is stored as a tensor")
            continue
        if item.dtype is None or item.shape is None or index.offset is None:
            raise ValueError(f"{fqn!r} is a tensor entry but is stored as bytes")
        if DTYPES[item.dtype] != entry.properties.dtype:
            raise ValueError(f"{fqn!r} is stored as {item.dtype}, its entry says {entry.properties.dtype}")
        offset, size = tuple(index.offset), tuple(entry.size)
        if not len(offset) == len(item.shape) == len(size) or any(
            o + n > total for o, n, total in zip(offset, item.shape, size, strict=True)
        ):
            raise ValueError(f"{fqn!r}: stored box {item.shape} at {offset} lies outside size {size}")
        numel = 1
        for n in item.shape:
            numel *= n
        if numel * DTYPES[item.dtype].itemsize != item.nbytes:
            raise ValueError(f"{fqn!r}: {item.nbytes} bytes stored for shape {item.shape} of {item.dtype}")


def decode_metadata(body: dict[str, Any], key: str) -> Metadata:
    """Rebuild DCP's Metadata (storage_data maps MetadataIndex → StoredItem)."""
    try:
        meta = body["storage_meta"]
        storage_meta = (
            None
            if meta is None
            else StorageMeta(
                checkpoint_id=meta["checkpoint_id"],
                save_id=meta["save_id"],
                load_id=meta["load_id"],
                modules=list(meta["modules"]),
            )
        )
        state = {str(fqn): _decode_entry(entry) for fqn, entry in body["state_dict"]}
        items = dict(_decode_item(item) for item in decode_items(body, key))
        _check_consistent(state, items)
        return Metadata(
            state_dict_metadata=state,
            planner_data=body["planner_data"],
            storage_data=items,
            storage_meta=storage_meta,
            version=body["dcp_version"],
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(
            f"{key}: the record is malformed ({type(exc).__name__}: {exc}); the checkpoint cannot be loaded",
            key=key,
        ) from exc
