"""Property-based fuzz of what kvckpt parses from outside: the record and checkpoint_id URLs.

Only kvckpt errors escape; every example finishes within the deadline (a hang detector with a wide
margin, not a speed claim); no hostile length field allocates more than a small multiple of the
input. Example counts are fixed here and listed in docs/reliability.md.
"""

from __future__ import annotations

import functools
import re
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from kvckpt import record
from kvckpt.dcp.codec import chunk_keys, decode_metadata, encode_metadata
from kvckpt.errors import InvalidCheckpointIdError, KVCheckpointError
from kvckpt.layout import StoredChunk, StoredItem
from kvckpt.registry import parse_url, schemes
from kvckpt.urls import StoreURL, redact

#: Examples per property; the sum is what docs/reliability.md and the README report.
EXAMPLES = {"record_bytes": 1500, "record_mutations": 800, "url_text": 1000, "url_shaped": 1000}


def fuzz(name: str) -> settings:
    return settings(
        max_examples=EXAMPLES[name],
        deadline=timedelta(seconds=2),
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )


def decode(data: bytes) -> Metadata | None:
    """What a reader does with the record's bytes; None when only a kvckpt error came out."""
    try:
        body = record.decode_record(data, "ns/.metadata")
        chunk_keys(body)  # what delete and an overwrite's retire read
        return decode_metadata(body, "ns/.metadata")
    except KVCheckpointError:
        return None


def bounded(fn: Any, data: bytes) -> Any:
    """Run ``fn(data)``; fail if it allocated far more than the input could justify."""
    tracemalloc.start()
    try:
        out = fn(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20) + 512 * len(data), f"{peak} bytes allocated for {len(data)} input bytes"
    return out


@functools.cache
def valid_body() -> dict[str, Any]:
    """A small but complete record: tensor shards, an object, planner data with tuples."""
    props = TensorProperties(torch.bfloat16, torch.strided, False, torch.contiguous_format, False)
    items = {
        MetadataIndex("w", [0, 0]): StoredItem(
            12, (StoredChunk("g1/w/0,0/0", 12, (1, 2)),), "bfloat16", (2, 3)
        ),
        MetadataIndex("w", [2, 0]): StoredItem(
            12, (StoredChunk("g1/w/2,0/0", 12, (3,)),), "bfloat16", (2, 3)
        ),
        MetadataIndex("o"): StoredItem(5, (StoredChunk("g1/o/bytes/0", 5, (4,)),)),
    }
    metadata = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(
                props,
                torch.Size([4, 3]),
                [ChunkStorageMetadata(torch.Size([r, 0]), torch.Size([2, 3])) for r in (0, 2)],
            ),
            "o": BytesStorageMetadata(),
        },
        planner_data={"w": ("model", "w"), "o": ("o",)},
        storage_data=items,
        storage_meta=StorageMeta(checkpoint_id="ns", save_id="g1", load_id=None, modules=[]),
        version="1.0.0",
    )
    body = {"save_id": "g1", "block_bytes": 1 << 20, **encode_metadata(metadata, items)}
    unpacked: dict[str, Any] = record.unpack(record.encode_record(body))
    return unpacked


def test_valid_body_decodes() -> None:
    """The seed of the mutation fuzz is itself a good record (else the fuzz proves little)."""
    assert decode(record.pack(valid_body())) is not None


# Record: raw bytes ----------------------------------------------------------------------------

HEADERS = [b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9", b"\xdc", b"\xde", b"\xda", b"\xc5", b"\xc8"]


@fuzz("record_bytes")
@given(
    st.one_of(
        st.binary(max_size=512),
        # a container or string header claiming up to 4 GiB, then a little of anything
        st.tuples(st.sampled_from(HEADERS), st.binary(min_size=4, max_size=4), st.binary(max_size=64)).map(
            b"".join
        ),
        # a valid record cut short, or with bytes flipped
        st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=3)).map(
            lambda cut: record.pack(valid_body())[: cut[0]] + cut[1]
        ),
    )
)
def test_fuzz_record_bytes(data: bytes) -> None:
    bounded(decode, data)


def test_hostile_length_headers_allocate_nothing() -> None:
    for header in HEADERS:
        for claim in (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x10\x00\x00"):
            data = header + claim[: 2 if header in (b"\xdc", b"\xde", b"\xda", b"\xc5", b"\xc8") else 4]
            assert bounded(decode, data + b"\x01" * 8) is None


# Record: structured mutations of a valid one --------------------------------------------------

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from(["tensor", "bytes", "float32", "bfloat16", "strided", "os.system", "", "g1/w/0,0/0"])
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _mutate(value: Any, data: st.DataObject, depth: int = 0) -> Any:
    """Replace or delete one randomly chosen node below the root of ``value``."""
    containers = isinstance(value, (dict, list, tuple)) and len(value) > 0
    if not containers or depth > 8 or (depth and data.draw(st.integers(0, 4)) == 0):
        return data.draw(VALUES)
    if isinstance(value, dict):
        # the envelope (format, version) is the byte fuzz's business: mutate the body
        keys = sorted((k for k in value if depth or k not in ("format", "version")), key=repr)
        key = data.draw(st.sampled_from(keys))
        out = dict(value)
        if data.draw(st.integers(0, 5)) == 0:
            del out[key]
        else:
            out[key] = _mutate(value[key], data, depth + 1)
        return out
    index = data.draw(st.integers(0, len(value) - 1))
    items = list(value)
    if data.draw(st.integers(0, 5)) == 0:
        del items[index]
    else:
        items[index] = _mutate(items[index], data, depth + 1)
    return tuple(items) if isinstance(value, tuple) else items


@fuzz("record_mutations")
@given(st.data(), st.integers(1, 3))
def test_fuzz_record_mutations(data: st.DataObject, rounds: int) -> None:
    body: Any = valid_body()
    for _ in range(rounds):
        body = _mutate(body, data)
    try:
        packed = record.pack(body)
    except KVCheckpointError:
        return
    metadata = bounded(decode, packed)
    if metadata is not None:  # what got through is internally consistent
        for index, item in metadata.storage_data.items():
            assert sum(c.nbytes for c in item.chunks) == item.nbytes, index


# URLs -----------------------------------------------------------------------------------------


def check_url(text: str) -> None:
    try:
        url = parse_url(text)
    except InvalidCheckpointIdError:
        assert redact(text) is not None
        return
    assert isinstance(url, StoreURL) and url.namespace
    assert parse_url(url.to_url(redact=False)) == url  # what we print parses back to the same
    shown = url.to_url(redact=True)
    if url.password:
        assert parse_url(shown).password == "***"


@fuzz("url_text")
@given(st.text(max_size=120))
def test_fuzz_url_text(text: str) -> None:
    check_url(text)


URL_CHARS = st.sampled_from([*"aZ09:/@?#&=%[],.+-_ *~é空\\", "%2F", "%20", "%zz", "::1"])
URL_PART = st.lists(URL_CHARS, max_size=12).map("".join)


@fuzz("url_shaped")
@given(
    st.sampled_from([*schemes(), "http", "REDIS", "redis+"]),
    URL_PART,
    st.sampled_from(["", "@", "u@", "u:p@", ":p@", "u:p:q@", "u:p%40@"]),
    st.sampled_from(["h", "127.0.0.1", "[::1]", "h:6379", "h:0", "h:99999", "a:1,b:2", "", "h:x"]),
    URL_PART,
    st.sampled_from(["", "?db=1&namespace=ns", "?namespace=", "?db=x", "?a=b"]),
)
def test_fuzz_url_shaped(scheme: str, junk: str, auth: str, host: str, path: str, query: str) -> None:
    check_url(f"{scheme}://{auth}{host}/{path}{junk}{query}")


def test_reported_counts_match() -> None:
    """docs/reliability.md and the README state these counts; keep them in step with the tests."""
    root = Path(__file__).parent.parent
    doc = (root / "docs" / "reliability.md").read_text()
    readme = (root / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \|", doc, flags=re.MULTILINE)
    assert [int(n) for n in rows] == list(range(1, len(rows) + 1))
    for text in (doc, readme):
        assert f"**{len(rows)} scenarios**" in text
        assert f"**{sum(EXAMPLES.values()):,} fuzz examples**" in text


@pytest.mark.parametrize("data", [msgpack.packb([1] * 3), b"\x91\xc1"])
def test_not_a_record_names_its_key(data: bytes) -> None:
    with pytest.raises(KVCheckpointError) as info:
        record.decode_record(data, "ns/.metadata")
    assert getattr(info.value, "key", None) == "ns/.metadata"
