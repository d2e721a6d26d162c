"""Redis backends: standalone (standalone.py, over kvckpt's RESP transport), Cluster (cluster.py) and
an injected redis-py-compatible client (client.py). See docs/design.md for how they fit together."""

from __future__ import annotations

from typing import Any

from kvckpt.store import KVStore


def wrap_client(client: Any) -> KVStore:
    """A KVStore around a redis-py-compatible client; a ``redis.RedisCluster`` gets per-node batches."""
    import redis.cluster

    if isinstance(client, redis.cluster.RedisCluster):
        from kvckpt.stores.redis.cluster import RedisClusterStore

        return RedisClusterStore(client=client)
    from kvckpt.stores.redis.client import ClientStore

    return ClientStore(client=client)
