"""Redis backends: every KVStore operation once (operations.py), carried by one of three channels:
kvckpt's RESP transport to a standalone server (standalone.py; transport.py, retry.py) or to each node
of a Cluster (cluster.py, routing.py, slots.py), or an injected redis-py-compatible client (client.py;
client_cluster.py for a ``redis.RedisCluster``). See docs/design.md for how they fit together."""

from __future__ import annotations

from typing import Any

from kvckpt.errors import InvalidArgumentError
from kvckpt.store import KVStore


def wrap_client(client: Any) -> KVStore:
    """A KVStore around a redis-py-compatible client; a ``redis.RedisCluster`` sends to each key's node."""
    import redis.cluster

    if not all(callable(getattr(client, name, None)) for name in ("pipeline", "execute_command")):
        raise InvalidArgumentError(
            f"client= takes a redis-py-compatible client (redis.Redis, redis.RedisCluster, "
            f"fakeredis.FakeRedis) or a kvckpt.KVStore, got {type(client).__name__}; to connect by "
            "URL, leave client= out and pass the URL as the checkpoint_id",
            options=["client"],
        )

    if isinstance(client, redis.cluster.RedisCluster):
        from kvckpt.stores.redis.client_cluster import ClientClusterStore

        return ClientClusterStore(client=client)
    from kvckpt.stores.redis.client import ClientStore

    return ClientStore(client=client)
