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


class Backend:
    """How a test addresses one store: checkpoint ids, writer/reader options, and raw access."""

    def __init__(self, name: str, make_id, options: dict, raw) -> None:  # type: ignore[no-untyped-def]
        self.name, self._make_id, self.options, self.raw = name, make_id, options, raw

    def id(self, namespace: str) -> str:
        return self._make_id(namespace)


@pytest.fixture(params=["redis", "redis-unix", "fakeredis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every DCP-level test runs against each backend; raw is a redis-py-style client for tampering."""
    import fakeredis
    import redis

    if request.param == "fakeredis":
        client = fakeredis.FakeRedis()
        yield Backend("fakeredis", lambda ns: ns, {"client": client}, client)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    raw = redis.Redis(port=server.port)
    make = server.url if request.param == "redis" else server.unix_url
    yield Backend(request.param, lambda ns: make(ns), {}, raw)
    raw.close()
