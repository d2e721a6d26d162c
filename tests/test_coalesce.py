"""Range reads of one key that overlap or touch go out as one request, against real stores."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import redis
from hypothesis import given

from kvckpt import open_store
from kvckpt.dcp.coalesce import merge_spans, read_coalesced
from kvckpt.store import KVStore, RangeRead
from kvckpt.target import wrap_client
from tests.conftest import Backend
from tests.harness.servers import RedisServer

VALUE = bytes(range(256)) * 64  # 16 KiB whose every byte says where it came from


def store_of(backend: Backend) -> KVStore:
    if "client" in backend.options:
        return wrap_client(backend.options["client"])
    return open_store(backend.id("x"))


def reads_of(key: str, ranges: list[tuple[int, int]]) -> list[RangeRead]:
    return [RangeRead(key, offset, memoryview(bytearray(length))) for offset, length in ranges]


def test_each_read_gets_its_own_bytes(backend: Backend, namespace: str) -> None:
    store = store_of(backend)
    store.put_many([(f"{namespace}/a", VALUE), (f"{namespace}/b", VALUE[:100])])
    ranges = [(0, 4096), (4000, 200), (4096, 1), (8192, 100), (100, 50), (16380, 10)]
    reads = reads_of(f"{namespace}/a", ranges) + reads_of(f"{namespace}/b", [(90, 20), (50, 10)])
    reads += reads_of(f"{namespace}/missing", [(0, 8), (4, 8)])
    counts = read_coalesced(store, reads)
    # short where the value ends (16380 + 10 > 16 KiB, b holds 100 bytes), zero for a missing key
    assert counts == [4096, 200, 1, 100, 50, 4, 10, 10, 0, 0]
    for read, count in zip(reads, counts, strict=True):
        source = VALUE if read.key.endswith("/a") else VALUE[:100]
        assert bytes(read.into[:count]) == source[read.offset : read.offset + count]
    store.close()


def test_overlapping_ranges_cross_the_wire_once(redis_server: RedisServer, namespace: str) -> None:
    """Two reads sharing half their bytes (as neighbouring checksum-widened ranges do) cost 1.5x."""
    key, size = f"{namespace}/chunk", 1 << 20
    store = open_store(redis_server.url(namespace))
    store.put_many([(key, bytes(2 * size))])
    raw = redis.Redis(port=redis_server.port)

    def bytes_out(reads: list[RangeRead]) -> int:
        before = raw.info("stats")["total_net_output_bytes"]
        assert read_coalesced(store, reads) == [read.into.nbytes for read in reads]
        return int(raw.info("stats")["total_net_output_bytes"] - before)

    overlapping = bytes_out(reads_of(key, [(0, size), (size // 2, size)]))
    apart = bytes_out(reads_of(key, [(0, size), (size + 1, size - 1)]))
    assert 1.5 * size <= overlapping < 1.5 * size + 4096
    assert 2 * size - 1 <= apart < 2 * size + 4096
    raw.close()
    store.close()


ranges = st.lists(
    st.tuples(st.sampled_from("ab"), st.integers(0, 100), st.integers(0, 30)), min_size=1, max_size=12
)


@given(ranges, st.booleans())
def test_spans_cover_every_read_once(spec: list[tuple[str, int, int]], touching_only: bool) -> None:
    reads = [RangeRead(key, offset, memoryview(bytearray(length))) for key, offset, length in spec]
    spans = merge_spans(reads, touching_only=touching_only)
    assert sorted(i for span in spans for i in span.members) == list(range(len(reads)))
    for span in spans:
        for i in span.members:
            read = reads[i]
            assert read.key == span.key
            assert span.start <= read.offset and read.offset + read.into.nbytes <= span.stop
    per_key = {key: sorted((s.start, s) for s in spans if s.key == key) for key in "ab"}
    for key, found in per_key.items():
        for (_, first), (_, second) in itertools.pairwise(found):
            assert first.stop < second.start, key  # what could merge did
            if not touching_only:  # a store without ranges reads a value once, unless gaps are wide
                joined = reads[second.members[0]]
                wanted = sum(reads[i].into.nbytes for i in first.members) + joined.into.nbytes
                assert joined.offset + joined.into.nbytes - first.start > 2 * wanted, key
    for span in spans:  # a merged request is never more than twice what its reads want
        wanted = sum(reads[i].into.nbytes for i in span.members)
        assert len(span.members) == 1 or span.stop - span.start <= 2 * wanted or touching_only
