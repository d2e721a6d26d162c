"""RedisStore's bulk I/O under the conditions the DCP adapter creates: many threads, big values."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kvckpt.stores import redis as redis_store
from kvckpt.testing.servers import RedisServer
from kvckpt.urls import parse_url


def test_first_use_from_many_threads_builds_one_client(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """I/O threads all connect lazily at once; a second client would close the first one's sockets."""
    built: list[Any] = []
    real = redis_store.redis.Redis

    def slow_client(**kwargs: Any) -> Any:
        time.sleep(0.05)  # widen the window in which a racing thread would build its own
        built.append(real(**kwargs))
        return built[-1]

    monkeypatch.setattr(redis_store.redis, "Redis", slow_client)
    store = redis_store.RedisStore.from_url(parse_url(redis_server.url("x")))
    start = threading.Barrier(4)

    def use() -> None:
        start.wait()
        store.expire_many([f"{namespace}/missing"], None)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1
    store.close()
