"""DCP saves and loads on Redis beyond one node: Cluster, replicas (min_replicas), TLS, eviction safety."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import pytest
import redis
import torch

import kvckpt
from kvckpt import layout
from kvckpt.errors import ReplicationError, UnsafeStoreConfigWarning
from kvckpt.stores.redis.cluster import key_slot
from tests.harness.servers import (
    REDIS_CHECKPOINT_SETTINGS,
    RedisCluster,
    RedisReplicaPair,
    RedisServer,
    RedisTLSServer,
)
from tests.helpers import bits_equal, random_tensor
from tests.test_store_redis_cluster import keys_on

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def state(n: int = 60) -> dict[str, Any]:
    return {f"layer{i}.w": random_tensor((64, 33), torch.bfloat16, seed=i) for i in range(n)} | {"step": 11}


def blank(reference: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in reference.items()}


def assert_loaded(reference: dict[str, Any], loaded: dict[str, Any]) -> None:
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert bits_equal(value, loaded[key]), key
        else:
            assert loaded[key] == value, key


def test_cluster_round_trip_spreads_over_every_master_and_expires(
    redis_cluster: RedisCluster, namespace: str
) -> None:
    reference = state()
    kvckpt.save(reference, redis_cluster.url(namespace), chunk_bytes=1024)
    loaded = blank(reference)
    kvckpt.load(loaded, redis_cluster.url(namespace))
    assert_loaded(reference, loaded)
    assert all(keys_on(m.port, f"{namespace}/g") for m in redis_cluster.master_nodes())

    kvckpt.save(reference, redis_cluster.url(f"{namespace}/short"), ttl=30, chunk_bytes=1024)  # many packs
    record_key = layout.record_key(f"{namespace}/short")
    owner = redis_cluster.slot_owner(key_slot(record_key))
    assert 0 < redis.Redis(port=owner.port).pttl(record_key) <= 30_000
    for master in redis_cluster.master_nodes():
        client = redis.Redis(port=master.port)
        data = [k for k in client.scan_iter(match=f"{namespace}/short/g*")]
        assert data and all(30_000 < client.pttl(k) <= 90_000 for k in data)
        client.close()


def test_save_and_load_while_slots_migrate(redis_cluster: RedisCluster, namespace: str) -> None:
    record_slot = key_slot(layout.record_key(namespace))
    slots = sorted({record_slot, *range(7000, 7150)})  # the commit record's slot and 150 data slots
    # One target that owns none of these slots: moves in both directions would race the config
    # epochs, and replicas could keep a stale slot map that a later failover test trips over.
    sources = {redis_cluster.slot_owner(slot).port for slot in slots}
    target = next(m for m in redis_cluster.master_nodes() if m.port not in sources)
    moves = []
    for slot in slots:
        source = redis_cluster.begin_slot_migration(slot, target)
        moves.append((slot, source))
    reference = {f"t{i}": torch.full((16,), float(i)) for i in range(1500)}  # ~14 keys in those slots
    record_source = dict(moves)[record_slot]
    watcher = redis.Redis(port=target.port)
    tries = int(watcher.info("errorstats").get("errorstat_TRYAGAIN", {}).get("count", 0))

    def finish_the_record_slot_once_the_commit_waits() -> None:
        """The commit checks the save's marker and writes the record in one script: while their slot
        migrates, with the record not yet written, Redis answers TRYAGAIN, and the commit is retried
        (docs/operations-redis.md) until the slot has moved."""
        deadline = time.monotonic() + 60
        while int(watcher.info("errorstats").get("errorstat_TRYAGAIN", {}).get("count", 0)) == tries:
            assert time.monotonic() < deadline, "the commit never met its migrating slot"
            time.sleep(0.05)
        redis_cluster.move_slot_keys(record_slot, record_source, target)
        redis_cluster.finish_slot_migration(record_slot, target)

    mover = threading.Thread(target=finish_the_record_slot_once_the_commit_waits)
    try:
        mover.start()
        kvckpt.save(reference, redis_cluster.url(namespace))
        mover.join(60)
        moves = [(slot, source) for slot, source in moves if slot != record_slot]
        for slot, source in moves[::2]:  # half the slots move their keys now: ASK redirects
            redis_cluster.move_slot_keys(slot, source, target)
        loaded = blank(reference)
        kvckpt.load(loaded, redis_cluster.url(namespace))
        assert_loaded(reference, loaded)
    finally:
        mover.join(60)
        watcher.close()
        for slot, source in moves:
            redis_cluster.move_slot_keys(slot, source, target)
            redis_cluster.finish_slot_migration(slot, target)
    loaded = blank(reference)
    kvckpt.load(loaded, redis_cluster.url(namespace))  # stale slot tables: MOVED, refresh, re-route
    assert_loaded(reference, loaded)


def test_committed_checkpoint_survives_a_master_failover(redis_cluster: RedisCluster, namespace: str) -> None:
    reference = state(40)
    kvckpt.save(reference, redis_cluster.url(namespace), min_replicas=1, replica_timeout=5)
    master, replica = redis_cluster.kill_master()
    try:
        redis_cluster.wait_for_promotion(replica)
        loaded = blank(reference)
        kvckpt.load(loaded, redis_cluster.url(namespace, startup=3))
        assert_loaded(reference, loaded)
    finally:
        redis_cluster.restart(master)


def test_min_replicas_waits_and_refuses_without_replicas(
    redis_replica_pair: RedisReplicaPair, namespace: str
) -> None:
    reference = state(10)
    kvckpt.save(reference, redis_replica_pair.url(f"{namespace}/ok"), min_replicas=1, replica_timeout=5)
    replica = redis.Redis(port=redis_replica_pair.replica.port)
    assert replica.exists(layout.record_key(f"{namespace}/ok"))
    redis_replica_pair.stop_replica()
    try:
        with pytest.raises(ReplicationError, match="replica"):
            kvckpt.save(
                reference, redis_replica_pair.url(f"{namespace}/no"), min_replicas=1, replica_timeout=1
            )
        primary = redis.Redis(port=redis_replica_pair.primary.port)
        assert list(primary.scan_iter(match=f"{namespace}/no*")) == []
    finally:
        redis_replica_pair.start_replica()


def test_evicting_server_is_refused_unless_allowed(namespace: str) -> None:
    settings = REDIS_CHECKPOINT_SETTINGS | {"maxmemory-policy": "allkeys-lru"}
    with RedisServer(settings=settings) as server:
        with pytest.raises(kvckpt.UnsafeStoreConfigError, match="allkeys-lru"):
            kvckpt.save({"w": torch.ones(4)}, server.url(namespace))
        assert list(redis.Redis(port=server.port).scan_iter()) == []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kvckpt.save({"w": torch.ones(4)}, server.url(namespace), allow_eviction=True)
        assert any(issubclass(w.category, UnsafeStoreConfigWarning) for w in caught)
        loaded = {"w": torch.zeros(4)}
        kvckpt.load(loaded, server.url(namespace))
        assert torch.equal(loaded["w"], torch.ones(4))


def test_tls_round_trip(redis_tls_server: RedisTLSServer, namespace: str) -> None:
    reference = state(5)
    kvckpt.save(reference, redis_tls_server.url(namespace))
    loaded = blank(reference)
    kvckpt.load(loaded, redis_tls_server.url(namespace))
    assert_loaded(reference, loaded)
