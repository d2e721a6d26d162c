"""The commit record's envelope: msgpack, versioned, no pickle.

Tuples survive the round trip (DCP's planner_data maps fqns to tuple paths) as msgpack extension type
1. Lengths in a hostile record cannot allocate more than the record's own size (msgpack bounds every
container and string by the input length).
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvckpt.errors import CorruptCheckpointError, KVCheckpointError

FORMAT = "kvckpt"
VERSION = 1
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
        return tuple(unpack(data))
    raise ValueError(f"unknown msgpack extension type {code}")


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode_record(body: dict[str, Any]) -> bytes:
    return pack({"format": FORMAT, "version": VERSION, **body})


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
    if version != VERSION:
        raise CorruptCheckpointError(
            f"{key}: record version {version!r:.40} is not supported by this kvckpt (reads version "
            f"{VERSION}); upgrade kvckpt to load it",
            key=key,
        )
    return record


def chunk_keys(body: dict[str, Any]) -> list[str]:
    """Every data key (relative to the namespace) a decoded record refers to."""
    try:
        return [str(chunk[0]) for row in body["items"] for chunk in row[5]]
    except (KeyError, IndexError, TypeError) as exc:
        raise CorruptCheckpointError(f"the record's item list is malformed ({exc})") from exc
