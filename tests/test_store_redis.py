"""RedisStore honours the KVStore contract on a real redis-server (TCP and unix socket) and on fakeredis."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from kvckpt.registry import open_store
from kvckpt.store import KVStore
from kvckpt.stores.redis import RedisStore
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
        yield RedisStore(client=fakeredis.FakeRedis())
