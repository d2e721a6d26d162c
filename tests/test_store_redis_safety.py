"""Settings that can lose checkpoints are refused, a full server is StoreFullError, WAIT is enforced."""

from __future__ import annotations

import os
import signal
import time
import warnings
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from kvckpt.errors import ReplicationError, StoreFullError, UnsafeStoreConfigError, UnsafeStoreConfigWarning
from kvckpt.registry import open_store
from kvckpt.stores.redis.client import ClientStore
from kvckpt.stores.redis.standalone import RedisStore
from tests.harness.servers import RedisReplicaPair, RedisServer, redis_call


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A server of this module's own: the tests change its maxmemory settings."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    store = open_store(server.url("safety"))
    assert isinstance(store, RedisStore)
    yield store
    redis_call(server.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_call(server.port, "CONFIG", "SET", "maxmemory", 0)
    redis_call(server.port, "FLUSHALL")
    store.close()


def test_noeviction_passes(store: RedisStore) -> None:
    assert store.check_server_settings() == {store.description: "noeviction"}


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "allkeys-random"])
@pytest.mark.parametrize("maxmemory", ["0", "100mb"])
def test_evicting_policy_is_refused_or_warned(
    server: RedisServer, store: RedisStore, policy: str, maxmemory: str
) -> None:
    """Refused even with maxmemory 0: it can be set at runtime, and eviction is silent."""
    redis_call(server.port, "CONFIG", "SET", "maxmemory", maxmemory)  # one per call: redis 6.2
    redis_call(server.port, "CONFIG", "SET", "maxmemory-policy", policy)
    with pytest.raises(UnsafeStoreConfigError, match=rf"maxmemory-policy is '{policy}'.*noeviction") as info:
        store.check_server_settings()
    assert info.value.policy == policy  # type: ignore[attr-defined]
    with pytest.warns(UnsafeStoreConfigWarning, match=policy):
        assert store.check_server_settings(allow_eviction=True) == {store.description: policy}


def test_unreadable_config_is_skipped_quietly() -> None:
    """fakeredis, like managed Redis with CONFIG renamed, refuses CONFIG GET: nothing to check."""
    store = ClientStore(client=fakeredis.FakeRedis())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.check_server_settings() == {}


def test_full_server_with_noeviction_is_store_full(server: RedisServer, store: RedisStore) -> None:
    used = int(redis_call(server.port, "INFO", "memory")["used_memory"])
    redis_call(server.port, "CONFIG", "SET", "maxmemory", used + (2 << 20))
    chunk = memoryview(bytes(range(256)) * 2048)  # 512 KiB
    with pytest.raises(StoreFullError, match="out of memory"):
        store.put_many([(f"safety/chunk/{i}", chunk) for i in range(16)])
    assert store.get("safety/chunk/0") == bytes(chunk)  # what was acknowledged is kept: nothing evicted


def test_wait_for_replicas_with_a_linked_replica(
    redis_replica_pair: RedisReplicaPair, namespace: str
) -> None:
    store = open_store(redis_replica_pair.url(namespace))
    assert isinstance(store, RedisStore)
    store.put_many([(f"{namespace}/{i}", b"x" * 1000) for i in range(200)])
    assert store.wait_for_replicas(1, 5.0) == 1
    assert store.wait_for_replicas(0, 1.0) >= 0
    store.close()


def test_wait_for_replicas_raises_within_the_timeout_when_the_replica_is_down(
    redis_replica_pair: RedisReplicaPair, namespace: str
) -> None:
    # A socket timeout shorter than the WAIT: the WAIT is cut into slices instead of timing out.
    store = open_store(redis_replica_pair.url(namespace), timeout=0.5)
    assert isinstance(store, RedisStore)
    redis_replica_pair.stop_replica()
    try:
        store.put(f"{namespace}/k", b"v")
        started = time.monotonic()
        with pytest.raises(ReplicationError, match=r"only 0 of 1 replica") as info:
            store.wait_for_replicas(1, 1.2)
        elapsed = time.monotonic() - started
        assert 1.1 <= elapsed < 4.0, elapsed  # slack for a loaded CI machine; a hang is minutes
        assert (info.value.acked, info.value.wanted) == (0, 1)  # type: ignore[attr-defined]
    finally:
        redis_replica_pair.start_replica()
        store.close()


@pytest.mark.parametrize("fenced", [False, True], ids=["ping", "fence-key"])
def test_wait_covers_writes_made_on_other_connections(
    redis_replica_pair: RedisReplicaPair, namespace: str, fenced: bool
) -> None:
    """WAIT counts up to its own connection's last write; kvckpt's fencing write (or, before Redis
    7.2, a PING) first makes that "now".

    Without it, a connection idle since before another connection's writes reports a frozen replica
    as caught up (checked: a bare WAIT returns 1 here). The fence key is gone afterwards.
    """
    fence = f"{namespace}/.kvckpt-wait" if fenced else None
    store = open_store(redis_replica_pair.url(namespace))
    assert isinstance(store, RedisStore)
    store.put(f"{namespace}/a", b"1")
    assert store.wait_for_replicas(1, 5.0) == 1
    assert redis_replica_pair.replica.process is not None
    pid = redis_replica_pair.replica.process.pid
    os.kill(pid, signal.SIGSTOP)  # the replica stays connected but acknowledges nothing more
    try:
        other = redis.Redis(port=redis_replica_pair.primary.port)
        other.set(f"{namespace}/b", b"x" * 100_000)
        other.close()
        with pytest.raises(ReplicationError):
            store.wait_for_replicas(1, 0.3, fence)
        assert not store.exists(f"{namespace}/.kvckpt-wait")
    finally:
        os.kill(pid, signal.SIGCONT)
        store.close()


@pytest.mark.parametrize("bad", [(-1, 1.0), (1, 0.0)])
def test_wait_for_replicas_rejects_bad_arguments(store: RedisStore, bad: tuple[int, float]) -> None:
    with pytest.raises(ValueError):
        store.wait_for_replicas(*bad)
