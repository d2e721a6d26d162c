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
