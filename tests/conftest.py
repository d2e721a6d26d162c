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


# etcd fixtures (one contiguous block) ------------------------------------------------------------

from kvckpt.testing.servers import EtcdCluster, EtcdServer  # noqa: E402


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
