"""RedisStore honours the KVStore contract on a real redis-server (TCP and unix socket) and on fakeredis."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
import redis

from kvckpt.errors import KVCheckpointError
from kvckpt.registry import open_store
from kvckpt.store import KVStore
from kvckpt.stores.redis.client import ClientStore
from kvckpt.testing.conformance import StoreTests
from tests.harness.raw import RedisRaw
from tests.harness.servers import RedisServer


class TestRedisTCP(StoreTests):
    @pytest.fixture
    def raw(self, redis_server: RedisServer) -> RedisRaw:
        return RedisRaw(redis.Redis(port=redis_server.port))

    @pytest.fixture
    def store(self, redis_server: RedisServer) -> Iterator[KVStore]:
        store = open_store(redis_server.url("conformance"))
        yield store
        store.close()


class TestRedisUnixSocket(StoreTests):
    @pytest.fixture
    def raw(self, redis_server: RedisServer) -> RedisRaw:
        return RedisRaw(redis.Redis(unix_socket_path=redis_server.socket_path, db=3))

    @pytest.fixture
    def store(self, redis_server: RedisServer) -> Iterator[KVStore]:
        store = open_store(redis_server.unix_url("conformance", db=3))
        yield store
        store.close()


class TestFakeRedis(StoreTests):
    picklable = False

    @pytest.fixture
    def client(self) -> fakeredis.FakeRedis:
        return fakeredis.FakeRedis()

    @pytest.fixture
    def raw(self, client: fakeredis.FakeRedis) -> RedisRaw:
        return RedisRaw(client)

    @pytest.fixture
    def store(self, client: fakeredis.FakeRedis) -> Iterator[KVStore]:
        yield ClientStore(client=client)


def test_a_database_the_server_lacks_is_named(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url("x", db=16))  # 16 databases by default: 0-15
    with pytest.raises(KVCheckpointError, match=r"no such database.*0 to its 'databases' setting"):
        store.get("x/a")
    store.close()


def test_fake_stores_share_keys_only_through_one_server() -> None:
    import fakeredis

    from kvckpt.testing.fake_server import fake_store

    server = fakeredis.FakeServer()
    first, second, apart = fake_store(server), fake_store(server), fake_store()
    first.put("ns/k", b"v")
    assert second.get("ns/k") == b"v"
    assert apart.get("ns/k") is None
