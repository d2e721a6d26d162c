"""RedisStore honours the KVStore contract on a real redis-server (TCP and unix socket) and on fakeredis."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from kvckpt.errors import KVCheckpointError
from kvckpt.registry import open_store
from kvckpt.store import KVStore
from kvckpt.stores.redis.client import ClientStore
from kvckpt.testing.conformance import StoreTests
from tests.harness.servers import RedisServer


class TestRedisTCP(StoreTests):
    @pytest.fixture
    def store(self, redis_server: RedisServer) -> Iterator[KVStore]:
        store = open_store(redis_server.url("conformance"))
        yield store
        store.close()


class TestRedisUnixSocket(StoreTests):
    @pytest.fixture
    def store(self, redis_server: RedisServer) -> Iterator[KVStore]:
        store = open_store(redis_server.unix_url("conformance", db=3))
        yield store
        store.close()


class TestFakeRedis(StoreTests):
    picklable = False

    @pytest.fixture
    def store(self) -> Iterator[KVStore]:
        yield ClientStore(client=fakeredis.FakeRedis())


def test_a_database_the_server_lacks_is_named(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url("x", db=16))  # 16 databases by default: 0-15
    with pytest.raises(KVCheckpointError, match=r"no such database.*0 to its 'databases' setting"):
        store.get("x/a")
    store.close()
