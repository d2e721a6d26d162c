"""The few etcd v3 gRPC messages kvckpt needs, encoded and decoded by hand (protobuf wire format).

Why by hand: each published etcd client ships ``*_pb2.py`` generated for one range of protobuf
versions, and breaks when the user's other packages pin protobuf outside it. ``etcd3`` 0.12.0 (its
latest) declares ``protobuf>=3.6.1``, yet under protobuf 4.21, 5.29 and 7.36 ``import etcd3`` raises
"Descriptors cannot be created directly"; ``etcd-sdk-python`` 0.0.7's modules need protobuf 5.27.2
or later, which it does not declare. ``aetcd`` 1.0.0 (``protobuf>4,<8``; it too needs 5.27.2) is
asyncio-only: every ``aetcd.Client`` operation is a coroutine, while kvckpt's stores are synchronous,
called from DCP's and kvckpt's threads. The wire format of the messages used here is tiny and frozen
by etcd's API compatibility promise, so kvckpt needs only ``grpcio`` with identity serializers. It
also saves copies: a value goes into the request as a buffer joined once, and replies are parsed into
memoryviews of the received bytes.

Field numbers follow etcd's ``api/etcdserverpb/rpc.proto`` and ``api/mvccpb/kv.proto`` (3.3+).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union

#: Request pieces joined once before sending; values stay buffers until then.
Parts = list[Union[bytes, memoryview]]  # noqa: UP007 (a runtime alias on 3.10)

# gRPC method paths.
RANGE = "/etcdserverpb.KV/Range"
PUT = "/etcdserverpb.KV/Put"
DELETE_RANGE = "/etcdserverpb.KV/DeleteRange"
TXN = "/etcdserverpb.KV/Txn"
COMPACT = "/etcdserverpb.KV/Compact"
LEASE_GRANT = "/etcdserverpb.Lease/LeaseGrant"
LEASE_REVOKE = "/etcdserverpb.Lease/LeaseRevoke"
STATUS = "/etcdserverpb.Maintenance/Status"
ALARM = "/etcdserverpb.Maintenance/Alarm"
AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"

# RequestOp / ResponseOp oneof fields.
OP_RANGE, OP_PUT, OP_DELETE, OP_TXN = 1, 2, 3, 4
# Compare.result and Compare.target enums.
EQUAL, GREATER, LESS, NOT_EQUAL = 0, 1, 2, 3
VERSION, CREATE, MOD, VALUE, LEASE = 0, 1, 2, 3, 4
# Compare target_union field numbers, by target.
_COMPARE_FIELD = {VERSION: 4, CREATE: 5, MOD: 6, LEASE: 8}
# AlarmRequest.action and AlarmType.
ALARM_GET = 0
ALARM_NAMES = {0: "NONE", 1: "NOSPACE", 2: "CORRUPT"}
NOSPACE = 1

_VARINT, _LEN = 0, 2


def varint(n: int) -> bytes:
    """Base-128 varint; negative int64 values use ten bytes of two's complement, as protobuf does."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def int_field(field: int, n: int) -> bytes:
    """An int64/uint64/enum/bool field; zero is the default and is not sent (proto3)."""
    return _tag(field, _VARINT) + varint(int(n)) if n else b""


def bytes_field(field: int, data: bytes | memoryview) -> Parts:
    if not len(data):
        return []
    return [_tag(field, _LEN) + varint(_nbytes(data)), data]


def message_field(field: int, parts: Parts) -> Parts:
    """A nested message; unlike scalars an empty one is still sent (its presence matters)."""
    return [_tag(field, _LEN) + varint(size(parts)), *parts]


def _nbytes(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def size(parts: Parts) -> int:
    return sum(_nbytes(p) for p in parts)


def join(parts: Parts) -> bytes:
    return b"".join(parts)


# Requests -------------------------------------------------------------------------------------


def range_request(
    key: bytes,
    range_end: bytes = b"",
    *,
    limit: int = 0,
    keys_only: bool = False,
    count_only: bool = False,
) -> Parts:
    return [
        *bytes_field(1, key),
        *bytes_field(2, range_end),
        int_field(3, limit),
        int_field(8, keys_only),
        int_field(9, count_only),
    ]


def put_request(
    key: bytes,
    value: bytes | memoryview = b"",
    *,
    lease: int = 0,
    prev_kv: bool = False,
    ignore_value: bool = False,
) -> Parts:
    return [
        *bytes_field(1, key),
        *bytes_field(2, value),
        int_field(3, lease),
        int_field(4, prev_kv),
        int_field(5, ignore_value),
    ]


def delete_range_request(key: bytes, range_end: bytes = b"", prev_kv: bool = False) -> Parts:
    return [*bytes_field(1, key), *bytes_field(2, range_end), int_field(3, prev_kv)]


def request_op(kind: int, request: Parts) -> Parts:
    """A RequestOp wrapping a Range/Put/DeleteRange/Txn request (``kind`` is OP_*)."""
    return message_field(kind, request)


def compare(key: bytes, target: int, result: int, operand: int | bytes) -> Parts:
    """Compare ``target`` of ``key`` with ``operand`` (an int, or bytes for VALUE)."""
    head: Parts = [int_field(1, result), int_field(2, target), *bytes_field(3, key)]
    if target == VALUE:
        assert isinstance(operand, bytes)
        # An explicit empty value must still select the oneof, so write the field even when empty.
        return [*head, _tag(7, _LEN) + varint(len(operand)), operand]
    assert isinstance(operand, int)
    # Likewise a zero operand: the tag selects which target_union member is compared.
    return [*head, _tag(_COMPARE_FIELD[target], _VARINT) + varint(operand)]


def txn_request(compares: Sequence[Parts], success: Sequence[Parts], failure: Sequence[Parts] = ()) -> Parts:
    parts: Parts = []
    for field, items in ((1, compares), (2, success), (3, failure)):
        for item in items:
            parts += message_field(field, item)
    return parts


def commit_request(
    key: bytes, value: bytes | memoryview, marker: bytes, *, create: bool, lease: int = 0
) -> Parts:
    """The commit rule (docs/protocol.md) as one txn: if ``marker`` exists (and, with ``create``,
    ``key`` does not), put ``key`` (returning the previous value) and delete ``marker``; otherwise
    count ``marker``, so the reply says which condition failed."""
    compares = [compare(marker, VERSION, GREATER, 0)]
    if create:
        compares.append(compare(key, CREATE, EQUAL, 0))
    return txn_request(
        compares,
        [
            request_op(OP_PUT, put_request(key, value, lease=lease, prev_kv=True)),
            request_op(OP_DELETE, delete_range_request(marker)),
        ],
        [request_op(OP_RANGE, range_request(marker, count_only=True))],
    )


def lease_grant_request(ttl: int) -> Parts:
    return [int_field(1, ttl)]


def lease_revoke_request(lease: int) -> Parts:
    return [int_field(1, lease)]


def alarm_get_request() -> Parts:
    return [int_field(1, ALARM_GET)]


def compaction_request(revision: int, physical: bool = False) -> Parts:
    return [int_field(1, revision), int_field(2, physical)]


def authenticate_request(name: str, password: str) -> Parts:
    return [*bytes_field(1, name.encode()), *bytes_field(2, password.encode())]


# Replies --------------------------------------------------------------------------------------


def fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) pairs: an int for varints, a memoryview slice for length-delimited."""
    i, end = 0, buf.nbytes
    while i < end:
        tag, i = _read_varint(buf, i)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, i = _read_varint(buf, i)
            yield field, value
        elif wire_type == _LEN:
            length, i = _read_varint(buf, i)
            if i + length > end:
                raise ValueError("truncated protobuf message")
            yield field, buf[i : i + length]
            i += length
        elif wire_type == 1:  # fixed64: not used by etcd's messages here, skipped
            i += 8
        elif wire_type == 5:  # fixed32
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _view(data: bytes | memoryview) -> memoryview:
    return data if isinstance(data, memoryview) else memoryview(data)


@dataclass(frozen=True)
class KeyValue:
    """mvccpb.KeyValue; ``key`` and ``value`` are views into the reply (copy them to keep)."""

    key: memoryview
    value: memoryview
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


_EMPTY = memoryview(b"")


def parse_kv(buf: memoryview) -> KeyValue:
    key = value = _EMPTY
    ints = [0, 0, 0, 0]
    for field, v in fields(buf):
        if field == 1 and isinstance(v, memoryview):
            key = v
        elif field == 5 and isinstance(v, memoryview):
            value = v
        elif field in (2, 3, 4, 6) and isinstance(v, int):
            ints[(2, 3, 4, 6).index(field)] = _signed(v)
    return KeyValue(key, value, *ints)


def header_revision(buf: memoryview) -> int:
    for field, v in fields(buf):
        if field == 3 and isinstance(v, int):
            return _signed(v)
    return 0


@dataclass(frozen=True)
class RangeResponse:
    kvs: list[KeyValue]
    more: bool
    count: int
    revision: int


def parse_range_response(data: bytes | memoryview) -> RangeResponse:
    kvs, more, count, revision = [], False, 0, 0
    for field, v in fields(_view(data)):
        if field == 2 and isinstance(v, memoryview):
            kvs.append(parse_kv(v))
        elif field == 3 and isinstance(v, int):
            more = bool(v)
        elif field == 4 and isinstance(v, int):
            count = v
        elif field == 1 and isinstance(v, memoryview):
            revision = header_revision(v)
    return RangeResponse(kvs, more, count, revision)


def parse_delete_range_prev_kvs(data: bytes | memoryview) -> list[KeyValue]:
    """The deleted key-values when the DeleteRangeRequest asked for ``prev_kv``."""
    return [parse_kv(v) for field, v in fields(_view(data)) if field == 3 and isinstance(v, memoryview)]


def parse_delete_range_response(data: bytes | memoryview) -> int:
    """How many keys the DeleteRange removed."""
    for field, v in fields(_view(data)):
        if field == 2 and isinstance(v, int):
            return v
    return 0


def parse_put_response(data: bytes | memoryview) -> KeyValue | None:
    """The previous key-value when the PutRequest asked for ``prev_kv`` and the key existed."""
    for field, v in fields(_view(data)):
        if field == 2 and isinstance(v, memoryview):
            return parse_kv(v)
    return None


@dataclass(frozen=True)
class TxnResponse:
    succeeded: bool
    #: (OP_* kind, the inner response message) per op of the branch taken.
    responses: list[tuple[int, memoryview]]


def parse_txn_response(data: bytes | memoryview) -> TxnResponse:
    succeeded, responses = False, []
    for field, v in fields(_view(data)):
        if field == 2 and isinstance(v, int):
            succeeded = bool(v)
        elif field == 3 and isinstance(v, memoryview):
            for kind, inner in fields(v):
                if isinstance(inner, memoryview):
                    responses.append((kind, inner))
    return TxnResponse(succeeded, responses)


def delete_if_request(key: bytes, expected: bytes | memoryview) -> Parts:
    """A txn deleting ``key`` only while its value is ``expected``."""
    return txn_request(
        [compare(key, VALUE, EQUAL, bytes(expected))], [request_op(OP_DELETE, delete_range_request(key))]
    )


def parse_commit_response(data: bytes | memoryview) -> tuple[bool, bool, bytes | None]:
    """(written, marker alive, previous value) from the reply to commit_request."""
    txn = parse_txn_response(data)
    if txn.succeeded:
        put = parse_put_response(txn.responses[0][1])
        return True, True, None if put is None else bytes(put.value)
    return False, parse_range_response(txn.responses[0][1]).count > 0, None


def parse_lease_grant_response(data: bytes | memoryview) -> tuple[int, int, str]:
    """(lease id, granted TTL seconds, error text)."""
    lease = ttl = 0
    error = ""
    for field, v in fields(_view(data)):
        if field == 2 and isinstance(v, int):
            lease = _signed(v)
        elif field == 3 and isinstance(v, int):
            ttl = _signed(v)
        elif field == 4 and isinstance(v, memoryview):
            error = bytes(v).decode("utf-8", "replace")
    return lease, ttl, error


def parse_alarm_response(data: bytes | memoryview) -> list[tuple[int, int]]:
    """(member id, alarm type) per active alarm."""
    alarms = []
    for field, v in fields(_view(data)):
        if field == 2 and isinstance(v, memoryview):
            member = alarm = 0
            for f, x in fields(v):
                if f == 1 and isinstance(x, int):
                    member = x
                elif f == 2 and isinstance(x, int):
                    alarm = x
            alarms.append((member, alarm))
    return alarms


@dataclass(frozen=True)
class Status:
    """Maintenance.Status of the member that answered."""

    version: str
    db_size: int
    leader: int
    raft_index: int
    raft_term: int
    member_id: int
    revision: int
    db_size_in_use: int
    errors: tuple[str, ...]


def parse_status_response(data: bytes | memoryview) -> Status:
    version, errors = "", []
    ints = {3: 0, 4: 0, 5: 0, 6: 0, 9: 0}
    member_id = revision = 0
    for field, v in fields(_view(data)):
        if field == 1 and isinstance(v, memoryview):
            for f, x in fields(v):
                if f == 2 and isinstance(x, int):
                    member_id = x
                elif f == 3 and isinstance(x, int):
                    revision = _signed(x)
        elif field == 2 and isinstance(v, memoryview):
            version = bytes(v).decode()
        elif field == 8 and isinstance(v, memoryview):
            errors.append(bytes(v).decode("utf-8", "replace"))
        elif field in ints and isinstance(v, int):
            ints[field] = v
    return Status(
        version=version,
        db_size=ints[3],
        leader=ints[4],
        raft_index=ints[5],
        raft_term=ints[6],
        member_id=member_id,
        revision=revision,
        db_size_in_use=ints[9],
        errors=tuple(errors),
    )


def parse_authenticate_response(data: bytes | memoryview) -> str:
    for field, v in fields(_view(data)):
        if field == 2 and isinstance(v, memoryview):
            return bytes(v).decode()
    return ""


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (b"\\0" = no upper bound)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
