"""A KVStore on fakeredis, for testing code that saves and loads checkpoints without a server.

Every ``fakeredis.FakeRedis()`` is its own server unless several share a ``fakeredis.FakeServer``:
pass the same ``server`` to stores (or to ``kvckpt.save(..., client=...)`` clients) that must see each
other's keys.
"""

from __future__ import annotations

from typing import Any

from kvckpt.store import KVStore
from kvckpt.stores.redis.client import ClientStore


def fake_client(server: Any = None) -> Any:
    """A ``fakeredis.FakeRedis`` on ``server`` (a ``fakeredis.FakeServer``; a new one by default)."""
    import fakeredis

    return fakeredis.FakeRedis(server=server or fakeredis.FakeServer())


def fake_store(server: Any = None) -> KVStore:
    """A KVStore over ``fake_client(server)``; ``kvckpt.save(state, "ns", client=store)`` uses it."""
    return ClientStore(client=fake_client(server), description="fakeredis")
