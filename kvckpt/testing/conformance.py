"""The KVStore contract as a pytest class: a backend's test subclasses it and supplies ``store``.

class TestMyStore(StoreTests):
    @pytest.fixture
    def store(self):
        yield MyStore(...)

    @pytest.fixture
    def raw(self):  # optional: reads the server directly (kvckpt.testing.stateful.RawAccess)
        return MyServerReader(...)

With ``raw`` the suite also checks, on the server itself, that keys arrive as their UTF-8 bytes and
that TTLs are set and cleared; ``test_contract_against_a_model`` (needs hypothesis) runs random
operation sequences against a dict model (kvckpt.testing.stateful).
"""

from __future__ import annotations

import array
import pickle
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from kvckpt.errors import KVCheckpointError
from kvckpt.management.orphans import require_conditional_commit
from kvckpt.store import Commit, KVStore, RangeRead

if TYPE_CHECKING:
    from kvckpt.testing.stateful import RawAccess


class StoreTests:
    #: False for stores built around an injected client that cannot cross processes.
    picklable = True
    #: Seconds to wait for a short TTL to lapse; servers expire lazily or on a timer.
    expiry_wait = 3.0
    #: Random operation sequences test_contract_against_a_model runs (25 steps each).
    model_examples = 12

    @pytest.fixture
    def store(self) -> Iterator[KVStore]:
        raise NotImplementedError("a backend's test class supplies the store fixture")

    @pytest.fixture
    def raw(self) -> RawAccess | None:
        """A reader of the server that bypasses the store; None where the backend's test has none."""
        return None

    @pytest.fixture
    def prefix(self) -> str:
        return f"conformance/{uuid.uuid4().hex}/"

    def test_keys_reach_the_server_as_written(
        self, store: KVStore, raw: RawAccess | None, prefix: str
    ) -> None:
        if raw is None:
            pytest.skip("this backend's test supplies no raw access to its server")
        keys = [prefix + "plain", prefix + "ключ ✓/€", prefix + "a*b?[c]\\d", prefix + "sp ace"]
        store.put_many([(k, k.encode()) for k in keys])
        assert [raw.get(k) for k in keys] == [k.encode() for k in keys]
        assert raw.get(prefix + "never") is None

    def test_ttls_reach_the_server(self, store: KVStore, raw: RawAccess | None, prefix: str) -> None:
        if raw is None:
            pytest.skip("this backend's test supplies no raw access to its server")
        store.put_many([(prefix + "t", b"1")], ttl=60)
        store.put(prefix + "p", b"2")
        first = raw.ttl(prefix + "t")
        assert first is not None and 50 < first <= 60
        assert raw.ttl(prefix + "p") is None
        assert store.expire_many([prefix + "p"], 120) == [True]
        second = raw.ttl(prefix + "p")
        assert second is not None and 100 < second <= 120
        assert store.expire_many([prefix + "t"], None) == [True]
        assert raw.ttl(prefix + "t") is None

    def test_contract_against_a_model(self, store: KVStore, raw: RawAccess | None) -> None:
        from kvckpt.testing.stateful import check_contract

        check_contract(store, raw, max_examples=self.model_examples)

    def test_missing_key_is_none(self, store: KVStore, prefix: str) -> None:
        assert store.get(prefix + "nope") is None
        assert store.get_many([prefix + "a", prefix + "b"]) == [None, None]
        assert not store.exists(prefix + "nope")

    def test_put_get_round_trip_all_byte_values(self, store: KVStore, prefix: str) -> None:
        value = bytes(range(256)) * 17
        store.put(prefix + "k", value)
        assert store.get(prefix + "k") == value
        assert store.exists(prefix + "k")

    def test_empty_value_exists(self, store: KVStore, prefix: str) -> None:
        store.put(prefix + "empty", b"")
        assert store.get(prefix + "empty") == b""
        assert store.exists(prefix + "empty")

    def test_memoryview_of_wide_items_is_stored_as_bytes(self, store: KVStore, prefix: str) -> None:
        data = array.array("d", [1.5, -2.25, 3.0])
        store.put_many([(prefix + "f", memoryview(data))])
        assert store.get(prefix + "f") == data.tobytes()

    def test_value_near_max_chunk(self, store: KVStore, prefix: str) -> None:
        size = min(store.capabilities.max_value_bytes, 1 << 20)
        value = bytes(range(251)) * (size // 251)
        store.put(prefix + "big", memoryview(value))
        assert store.get(prefix + "big") == value

    def test_create_is_put_if_absent(self, store: KVStore, prefix: str) -> None:
        assert store.put(prefix + "rec", b"first", create=True) is True
        assert store.put(prefix + "rec", b"second", create=True) is False
        assert store.get(prefix + "rec") == b"first"
        assert store.put(prefix + "rec", b"third") is True
        assert store.get(prefix + "rec") == b"third"

    def test_swap_returns_previous(self, store: KVStore, prefix: str) -> None:
        assert store.swap(prefix + "rec", b"one") is None
        assert store.swap(prefix + "rec", b"two") == b"one"
        assert store.get(prefix + "rec") == b"two"

    @staticmethod
    def _refused_for_gc(store: KVStore) -> bool:
        """True, once checked, when the backend has no conditional commit: gc must refuse it then."""
        if store.capabilities.conditional_commit:
            return False
        with pytest.raises(KVCheckpointError, match="conditional commit"):
            require_conditional_commit(store)
        return True

    def _marked(self, store: KVStore, prefix: str) -> tuple[str, str]:
        """A record key and a live marker placed beside it, the way a save names them."""
        record = prefix + ".metadata"
        marker = store.colocated(prefix + ".live/g1", record)
        assert marker.startswith(prefix + ".live/g1")
        store.put(marker, b"alive", ttl=60)
        return record, marker

    def test_commit_needs_the_live_marker(self, store: KVStore, prefix: str) -> None:
        """docs/protocol.md: a commit lands only while its save's marker exists. A backend without
        the capability is refused by gc instead, which this checks."""
        if self._refused_for_gc(store):
            return
        record, marker = self._marked(store, prefix)
        store.delete(marker)
        for create in (True, False):
            assert store.commit(record, b"late", live_key=marker, create=create) == Commit(False, False)
        assert store.get(record) is None

    def test_commit_creates_once_and_consumes_the_marker(self, store: KVStore, prefix: str) -> None:
        if self._refused_for_gc(store):
            return
        record, marker = self._marked(store, prefix)
        assert store.commit(record, b"first", live_key=marker, create=True) == Commit(True, True)
        assert store.get(record) == b"first" and store.get(marker) is None
        record, marker = self._marked(store, prefix)
        assert store.commit(record, b"second", live_key=marker, create=True) == Commit(False, True)
        assert store.get(record) == b"first" and store.get(marker) == b"alive"

    def test_commit_swaps_and_returns_the_previous(self, store: KVStore, prefix: str) -> None:
        if self._refused_for_gc(store):
            return
        record, marker = self._marked(store, prefix)
        assert store.commit(record, b"one", live_key=marker, create=False) == Commit(True, True, None)
        record, marker = self._marked(store, prefix)
        assert store.commit(record, b"two", live_key=marker, create=False, ttl=60) == Commit(
            True, True, b"one"
        )
        assert store.get(record) == b"two" and store.get(marker) is None

    def test_delete_if_removes_only_the_expected_value(self, store: KVStore, prefix: str) -> None:
        if self._refused_for_gc(store):
            return
        store.put(prefix + "rec", b"listed")
        assert store.delete_if(prefix + "rec", b"other") is False
        assert store.get(prefix + "rec") == b"listed"
        assert store.delete_if(prefix + "rec", memoryview(b"listed")) is True
        assert store.get(prefix + "rec") is None
        assert store.delete_if(prefix + "rec", b"listed") is False

    def test_clock_grows_with_commits(self, store: KVStore, prefix: str) -> None:
        if self._refused_for_gc(store):
            return
        before = store.clock(prefix + ".metadata")
        record, marker = self._marked(store, prefix)
        assert store.commit(record, b"x", live_key=marker, create=True).written
        assert store.clock(record) > before

    def test_take_reads_and_removes(self, store: KVStore, prefix: str) -> None:
        store.put(prefix + "rec", b"record")
        assert store.take(prefix + "rec") == b"record"
        assert store.get(prefix + "rec") is None
        assert store.take(prefix + "rec") is None
        assert store.take(prefix + "never") is None

    def test_batched_put_and_get(self, store: KVStore, prefix: str) -> None:
        items = [(f"{prefix}item/{i}", f"value-{i}".encode()) for i in range(1500)]
        store.put_many(items)
        keys = [k for k, _ in items] + [prefix + "missing"]
        assert store.get_many(keys) == [v for _, v in items] + [None]

    def test_range_reads_into_buffers(self, store: KVStore, prefix: str) -> None:
        value = bytes(range(200))
        store.put(prefix + "r", value)
        head, middle, tail, past = bytearray(10), bytearray(50), bytearray(30), bytearray(5)
        empty = bytearray(0)
        counts = store.read_into_many(
            [
                RangeRead(prefix + "r", 0, memoryview(head)),
                RangeRead(prefix + "r", 100, memoryview(middle)),
                RangeRead(prefix + "r", 180, memoryview(tail)),
                RangeRead(prefix + "missing", 0, memoryview(past)),
                RangeRead(prefix + "r", 0, memoryview(empty)),
            ]
        )
        assert counts == [10, 50, 20, 0, 0]
        assert bytes(head) == value[:10]
        assert bytes(middle) == value[100:150]
        assert bytes(tail[:20]) == value[180:]

    def test_range_read_into_wide_buffer(self, store: KVStore, prefix: str) -> None:
        data = array.array("i", range(64))
        store.put(prefix + "ints", data.tobytes())
        target = array.array("i", [0] * 16)
        (count,) = store.read_into_many([RangeRead(prefix + "ints", 16 * 4, memoryview(target))])
        assert count == 64
        assert list(target) == list(range(16, 32))

    def test_value_sizes(self, store: KVStore, prefix: str) -> None:
        store.put_many([(prefix + "a", b"x" * 1000), (prefix + "e", b"")])
        assert store.value_sizes([prefix + "a", prefix + "missing", prefix + "e"]) == [1000, 0, 0]
        assert store.value_sizes([]) == []

    def test_delete_is_idempotent(self, store: KVStore, prefix: str) -> None:
        store.put_many([(prefix + "a", b"1"), (prefix + "b", b"2")])
        store.delete_many([prefix + "a", prefix + "never-there"])
        store.delete_many([prefix + "a"])
        assert store.get_many([prefix + "a", prefix + "b"]) == [None, b"2"]
        store.delete(prefix + "b")
        assert not store.exists(prefix + "b")

    def test_scan_prefix_is_literal(self, store: KVStore, prefix: str) -> None:
        tricky = prefix + "a*b?[c]\\d é /"
        inside = [tricky + "x", tricky + "y/z"]
        outside = [prefix + "a*b?[c]\\d é  x", prefix + "aXb?[c]\\d é /x", prefix + "a*b"]
        store.put_many([(k, b"v") for k in inside + outside])
        assert sorted(store.scan_prefix(tricky)) == sorted(inside)
        assert sorted(store.scan_prefix(prefix)) == sorted(inside + outside)

    def test_delete_prefix(self, store: KVStore, prefix: str) -> None:
        store.put_many([(f"{prefix}gen/{i}", b"x") for i in range(2500)])
        store.put(prefix + "keep", b"k")
        assert store.delete_prefix(prefix + "gen/", batch=700) == 2500
        assert list(store.scan_prefix(prefix)) == [prefix + "keep"]

    def test_ttl_on_put_expires(self, store: KVStore, prefix: str) -> None:
        if not store.capabilities.ttl:
            pytest.skip("backend declares no TTL support")
        store.put_many([(prefix + "short", b"x")], ttl=1.0)
        store.put(prefix + "rec", b"y", create=True, ttl=1.0)
        store.put(prefix + "long", b"z")
        assert store.get(prefix + "short") == b"x"
        self._wait_gone(store, [prefix + "short", prefix + "rec"])
        assert store.get(prefix + "long") == b"z"

    def test_expire_many_sets_and_clears(self, store: KVStore, prefix: str) -> None:
        if not store.capabilities.ttl:
            pytest.skip("backend declares no TTL support")
        store.put_many([(prefix + "a", b"1"), (prefix + "b", b"2")], ttl=1.0)
        assert store.expire_many([prefix + "a", prefix + "missing"], None) == [True, False]
        assert store.expire_many([prefix + "b"], 30.0) == [True]
        time.sleep(1.5)
        assert store.get_many([prefix + "a", prefix + "b"]) == [b"1", b"2"]
        store.put(prefix + "c", b"3")
        assert store.expire_many([prefix + "c"], None) == [True]
        assert store.expire_many([prefix + "c"], 1.0) == [True]
        self._wait_gone(store, [prefix + "c"])

    def _wait_gone(self, store: KVStore, keys: list[str]) -> None:
        deadline = time.monotonic() + self.expiry_wait + 1.0
        while any(v is not None for v in store.get_many(keys)):
            assert time.monotonic() < deadline, f"{keys} did not expire"
            time.sleep(0.1)

    def test_pickle_round_trip_reconnects(self, store: KVStore, prefix: str) -> None:
        if not self.picklable:
            with pytest.raises(KVCheckpointError, match="cannot be pickled"):
                pickle.dumps(store)
            return
        store.put(prefix + "p", b"pickled")
        clone = pickle.loads(pickle.dumps(store))
        try:
            assert clone.get(prefix + "p") == b"pickled"
        finally:
            clone.close()

    def test_close_then_reuse(self, store: KVStore, prefix: str) -> None:
        store.put(prefix + "c", b"1")
        store.close()
        assert store.get(prefix + "c") == b"1"
