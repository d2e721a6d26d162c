"""EtcdStore on real etcd members: the KVStore contract, etcd's limits, quota, auth and failover."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.etcd_bench import measure
from kvckpt.errors import (
    CheckpointTooLargeError,
    KVCheckpointError,
    MissingDependencyError,
    StoreFullError,
    StoreUnavailableError,
)
from kvckpt.registry import backend_for, open_store
from kvckpt.store import KVStore, RangeRead
from kvckpt.stores.etcd import wire as pb
from kvckpt.stores.etcd.store import EtcdStore
from kvckpt.testing.conformance import StoreTests
from tests.harness.raw import EtcdRaw
from tests.harness.servers import EtcdCluster, EtcdServer, find_binary, free_port

MiB = 1 << 20


class TestEtcd(StoreTests):
    # etcd leases are whole seconds and at least ~2 s; expiry is checked every 500 ms.
    expiry_wait = 4.0

    @pytest.fixture
    def raw(self, etcd_server: EtcdServer) -> EtcdRaw:
        return EtcdRaw(etcd_server.endpoint)

    @pytest.fixture
    def store(self, etcd_server: EtcdServer) -> Iterator[KVStore]:
        store = open_store(etcd_server.url("conformance"))
        yield store
        store.close()


@pytest.fixture
def store(etcd_server: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore.from_url(_parse(etcd_server.url()))
    yield s
    s.close()


@pytest.fixture
def prefix() -> str:
    return f"etcd-test/{uuid.uuid4().hex[:12]}/"


def _parse(url: str):  # type: ignore[no-untyped-def]
    from kvckpt.registry import parse_url

    return parse_url(url)


def _pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


# Wire format --------------------------------------------------------------------------------------


@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1))
def test_varint_round_trip(n: int) -> None:
    encoded = pb.varint(n)
    value, end = pb._read_varint(memoryview(encoded), 0)
    assert end == len(encoded)
    assert pb._signed(value) == n


def test_prefix_end() -> None:
    assert pb.prefix_end(b"a/b") == b"a/c"
    assert pb.prefix_end(b"a\xff") == b"b"
    assert pb.prefix_end(b"\xff\xff") == b"\x00"
    assert pb.prefix_end(b"") == b"\x00"


def test_url_options_and_lazy_connect() -> None:
    dead = free_port()
    store = open_store(f"etcd://127.0.0.1:{dead},[::1]:{dead}/ns", max_request_bytes=4 * MiB)
    assert isinstance(store, EtcdStore)
    assert store.targets == [f"127.0.0.1:{dead}", f"[::1]:{dead}"]
    assert store.capabilities.max_value_bytes == 4 * MiB - 8 * 1024
    assert store.capabilities.native_ranges is False
    assert store.capabilities.max_batch_ops == 128
    assert store.client.endpoints is None  # nothing connects until the first call


def test_missing_grpc_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)
    for module in ("kvckpt.stores.etcd.store", "kvckpt.stores.etcd.client"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingDependencyError, match=r"kvckpt\[etcd\]"):
        backend_for("etcd")
    monkeypatch.undo()
    importlib.import_module("kvckpt.stores.etcd.store")


# Limits -------------------------------------------------------------------------------------------


def test_value_over_limit_is_rejected_clearly(store: EtcdStore, prefix: str) -> None:
    limit = store.capabilities.max_value_bytes
    exact = _pattern(limit)
    store.put(prefix + "exact", exact)
    assert store.get(prefix + "exact") == exact
    too_big = memoryview(_pattern(limit + 1))
    for write in (
        lambda: store.put(prefix + "big", too_big),
        lambda: store.put(prefix + "big", too_big, create=True),
        lambda: store.swap(prefix + "big", too_big),
        lambda: store.put_many([(prefix + "ok", b"x"), (prefix + "big", too_big)]),
    ):
        with pytest.raises(KVCheckpointError, match="max_value_bytes") as info:
            write()
        assert "--max-request-bytes" in str(info.value)
        assert info.value.limit == limit  # type: ignore[attr-defined]
    assert store.get_many([prefix + "big", prefix + "ok"]) == [None, None]


def test_server_limit_below_client_setting_is_explained() -> None:
    with EtcdServer(max_request_bytes=256 * 1024, unsafe_no_fsync=True) as server:
        store = open_store(server.url())  # still assumes etcd's default 1.5 MiB
        with pytest.raises(KVCheckpointError, match="max_request_bytes=") as info:
            store.put("k", _pattern(MiB))
        assert "--max-request-bytes" in str(info.value)
        small = open_store(server.url(), max_request_bytes=256 * 1024)
        small.put("k", _pattern(200 * 1024))
        assert small.get("k") == _pattern(200 * 1024)


def test_batches_respect_txn_op_limit(store: EtcdStore, prefix: str) -> None:
    # etcd rejects a txn of more than 128 ops: every batched call must split.
    keys = [f"{prefix}k/{i:04d}" for i in range(1000)]
    store.put_many([(k, k.encode()) for k in keys])
    assert store.get_many(keys) == [k.encode() for k in keys]
    assert store.expire_many([*keys[:300], prefix + "missing"], 60) == [True] * 300 + [False]
    assert store.expire_many(keys[:300], None) == [True] * 300
    store.delete_many(keys[:700])
    assert sorted(store.scan_prefix(prefix)) == keys[700:]


def test_txn_op_limit_is_configurable() -> None:
    with EtcdServer(extra_args=["--max-txn-ops", "16"], unsafe_no_fsync=True) as server:
        items = [(f"k/{i}", b"v") for i in range(40)]
        with pytest.raises(KVCheckpointError, match="too many operations"):
            open_store(server.url()).put_many(items)
        store = open_store(server.url(), max_txn_ops=16)
        store.put_many(items)
        assert store.get_many([k for k, _ in items]) == [b"v"] * 40


def test_put_many_splits_by_request_bytes_and_repeats_keep_last(store: EtcdStore, prefix: str) -> None:
    values = [_pattern(MiB, seed=i) for i in range(6)]  # one txn would be 6 MiB: over the 1.5 MiB limit
    items = [(f"{prefix}{i}", memoryview(v)) for i, v in enumerate(values)]
    store.put_many([(prefix + "0", b"stale"), *items])
    assert store.get_many([k for k, _ in items]) == values


def test_multi_mib_reads_are_batched(store: EtcdStore, prefix: str) -> None:
    size = store.capabilities.max_value_bytes
    values = [_pattern(size, seed=i) for i in range(12)]  # ~18 MiB: beyond one 4 MiB reply
    keys = [f"{prefix}big/{i}" for i in range(12)]
    store.put_many(list(zip(keys, values, strict=True)))
    assert store.get_many([*keys, prefix + "none", keys[0]]) == [*values, None, values[0]]
    target = bytearray(100)
    assert store.read_into_many([RangeRead(keys[5], size - 50, memoryview(target))]) == [50]
    assert bytes(target[:50]) == values[5][-50:]


def test_reply_overflow_splits_batches(etcd_server: EtcdServer, prefix: str) -> None:
    # A tiny reply budget: the first probe batch overflows the receive limit and must be split.
    store = open_store(etcd_server.url(), max_reply_bytes=64 * 1024)
    assert isinstance(store, EtcdStore)
    size = store.capabilities.max_value_bytes
    values = [_pattern(size, seed=i) for i in range(5)]
    keys = [f"{prefix}{i}" for i in range(5)]
    store.put_many(list(zip(keys, values, strict=True)))
    assert store.receive_limit < 4 * size
    assert store.get_many(keys) == values


def test_large_prefix_scan_is_paginated(etcd_server: EtcdServer, prefix: str) -> None:
    store = open_store(etcd_server.url(), scan_page=100)
    inside = [f"{prefix}in/{i:05d}" for i in range(1050)]
    store.put_many([(k, b"") for k in inside] + [(prefix + "in", b""), (prefix + "io/x", b"")])
    found = list(store.scan_prefix(prefix + "in/"))
    assert len(found) == len(set(found)) == 1050
    assert sorted(found) == inside
    assert store.delete_prefix(prefix, batch=400) == 1052


def test_non_utf8_keys_round_trip(store: EtcdStore, prefix: str) -> None:
    odd = prefix + "\udcff\udcfe/x"  # bytes ff fe: the prefix's upper bound must not wrap
    store.put(odd, b"1")
    assert list(store.scan_prefix(prefix + "\udcff")) == [odd]
    assert store.get(odd) == b"1"
    assert odd in set(store.scan_prefix(""))  # an empty prefix is every key


def test_check_total_bytes(etcd_server: EtcdServer) -> None:
    store = open_store(etcd_server.url(), max_total_bytes=10 * MiB)
    assert isinstance(store, EtcdStore)
    store.check_total_bytes(10 * MiB)
    with pytest.raises(CheckpointTooLargeError, match="--quota-backend-bytes") as info:
        store.check_total_bytes(10 * MiB + 1)
    assert "Redis" in str(info.value)
    uncapped = open_store(etcd_server.url(), max_total_bytes=None)
    assert isinstance(uncapped, EtcdStore)
    uncapped.check_total_bytes(1 << 40)


def test_clearing_ttl_on_a_key_without_lease_writes_nothing(store: EtcdStore, prefix: str) -> None:
    store.put(prefix + "plain", b"x")
    before = store.status().revision
    assert store.expire_many([prefix + "plain"], None) == [True]
    assert store.status().revision == before
    store.put(prefix + "leased", b"y", ttl=60)
    before = store.status().revision
    assert store.expire_many([prefix + "leased"], None) == [True]
    assert store.status().revision == before + 1  # detaching re-puts the key: one new revision
    assert store.get(prefix + "leased") == b"y"


# Quota --------------------------------------------------------------------------------------------


def test_quota_exhaustion_raises_store_full_with_a_way_out() -> None:
    ctl = find_binary("etcdctl")
    with EtcdServer(quota_backend_bytes=8 * MiB, unsafe_no_fsync=True) as server:
        store = open_store(server.url())
        value = _pattern(MiB)
        written = []
        with pytest.raises(StoreFullError) as info:
            for i in range(64):
                store.put(f"fill/{i}", value)
                written.append(f"fill/{i}")
        message = str(info.value)
        for hint in ("compact", "defrag", "alarm disarm", "--quota-backend-bytes", "Redis"):
            assert hint in message
        assert isinstance(store, EtcdStore)
        assert [alarm for _, alarm in store.alarms()] == ["NOSPACE"]
        for write in (
            lambda: store.put_many([("more", b"x")], ttl=30),
            lambda: store.put("rec", b"x", create=True),
        ):
            with pytest.raises(StoreFullError):
                write()
        # etcd refuses every txn under NOSPACE, read-only ones too: reads and deletes fall back
        # to plain Range / DeleteRange calls, which it still serves.
        assert store.get_many(written[:3]) == [value] * 3
        store.delete_many(written)
        assert store.get_many(written[:3]) == [None] * 3

        # The documented way out works.
        revision = store.status().revision
        env = {**os.environ, "ETCDCTL_API": "3"}
        for args in (["compact", str(revision)], ["defrag"], ["alarm", "disarm"]):
            subprocess.run(
                [ctl, "--endpoints", server.endpoint, *args], check=True, env=env, capture_output=True
            )
        store.put("after", b"ok")
        assert store.get("after") == b"ok"


# Auth ---------------------------------------------------------------------------------------------


def test_user_and_password() -> None:
    ctl = find_binary("etcdctl")
    with EtcdServer(unsafe_no_fsync=True) as server:
        env = {**os.environ, "ETCDCTL_API": "3"}
        for args in (
            ["user", "add", "root", "--new-user-password", "s3cret-pw"],
            ["user", "grant-role", "root", "root"],
            ["auth", "enable"],
        ):
            subprocess.run(
                [ctl, "--endpoints", server.endpoint, *args], check=True, env=env, capture_output=True
            )
        store = open_store(f"etcd://root:s3cret-pw@{server.endpoint}/ns")
        store.put("k", b"v")
        assert store.get("k") == b"v"
        assert "s3cret-pw" not in repr(store)
        with pytest.raises(StoreUnavailableError, match="authentication") as info:
            open_store(f"etcd://root:wrong-pw@{server.endpoint}/ns").get("k")
        assert "wrong-pw" not in str(info.value)


# Availability -------------------------------------------------------------------------------------


def test_nothing_listening_fails_fast() -> None:
    store = open_store(f"etcd://127.0.0.1:{free_port()}/ns", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="UNAVAILABLE"):
        store.get("k")
    assert time.monotonic() - started < 5


def test_dead_first_endpoint_is_skipped(etcd_server: EtcdServer) -> None:
    store = open_store(f"etcd://127.0.0.1:{free_port()},{etcd_server.endpoint}/ns")
    store.put("failover/k", b"v")
    assert store.get("failover/k") == b"v"


def test_cluster_survives_one_member_and_fails_fast_without_quorum(etcd_cluster: EtcdCluster) -> None:
    store = open_store(etcd_cluster.url(), timeout=8.0)
    value = _pattern(MiB)
    store.put_many([("c/a", value), ("c/b", b"small")])
    assert store.put("c/rec", b"r1", create=True)

    etcd_cluster.stop_member(0, kill=True)  # the endpoint the store was using
    assert store.get_many(["c/a", "c/b"]) == [value, b"small"]
    store.put("c/after-one-down", b"ok")
    assert store.swap("c/rec", b"r2") == b"r1"
    assert store.get("c/after-one-down") == b"ok"

    etcd_cluster.stop_member(1, kill=True)  # quorum lost
    attempts: list[Callable[[], bool]] = [
        lambda: store.put("c/no-quorum", b"x"),
        lambda: store.put("c/rec2", b"x", create=True),
    ]
    for attempt in attempts:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            attempt()
        assert time.monotonic() - started < 10

    etcd_cluster.start_member(0, wait=False)
    etcd_cluster.start_member(1)
    deadline = time.monotonic() + 20
    while True:  # the store recovers by itself once a quorum is back
        try:
            store.put("c/recovered", b"yes")
            break
        except StoreUnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert store.get_many(["c/recovered", "c/rec"]) == [b"yes", b"r2"]
    # A write that timed out inside a member may still commit once quorum is back: its outcome is
    # unknown, which is why the adapter writes its commit record last and conditionally.
    assert store.get("c/no-quorum") in (None, b"x")


# Benchmark helper ---------------------------------------------------------------------------------


def test_benchmark_helper_reports_rates(etcd_server: EtcdServer) -> None:
    result = measure(open_store(etcd_server.url()), value_bytes=64 * 1024, total_bytes=MiB)
    assert result["put_mb_s"] > 0 and result["get_mb_s"] > 0
