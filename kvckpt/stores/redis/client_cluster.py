"""KVStore over a ``redis.RedisCluster`` the caller passes in: redis-py routes, kvckpt only sends.

The client keeps its own connections, slot table and retry policy. Batches go through its pipeline,
which groups commands by node and follows redirections; a command on one key alone (a commit, the
clock) goes to the key's primary as a plain ``redis.Redis``, so it is sent once and can be fenced
(kvckpt.stores.redis.client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kvckpt.stores.redis.client import ClientChannel, ClientStore, pipeline_runner
from kvckpt.stores.redis.replicas import WaitOne
from kvckpt.stores.redis.slots import fence_key_on, key_slot
from kvckpt.stores.redis.transport import Reply


class ClientClusterChannel(ClientChannel):
    """Commands through an injected ``redis.RedisCluster``."""

    cluster = True

    def owner(self, key: str) -> Any:
        client = self.client
        return client.get_redis_connection(client.nodes_manager.get_node_from_slot(key_slot(key)))

    def scan(self, pattern: str) -> Iterator[Reply]:
        for node in self.client.get_primaries():
            yield from self.client.get_redis_connection(node).scan_iter(match=pattern, count=1000)

    def nodes(self) -> list[tuple[str, Any]]:
        client = self.client
        return [
            (f"{self.description} node {n.name}", client.get_redis_connection(n)) for n in client.get_nodes()
        ]

    def wait_each(self, wait: WaitOne, fence_key: str | None) -> dict[str | None, int]:
        """Every primary (the client does not say which ones took this store's writes)."""
        client = self.client
        owner = client.nodes_manager.get_node_from_slot

        def owned_by(name: str) -> Callable[[int], bool]:
            return lambda slot: bool(owner(slot).name == name)

        return {
            node.name: wait(
                pipeline_runner(client.get_redis_connection(node)),
                fence_key_on(fence_key, owned_by(node.name)),
            )
            for node in client.get_primaries()
        }


class ClientClusterStore(ClientStore):
    """KVStore over an injected ``redis.RedisCluster``."""

    def __init__(self, *, client: Any, description: str = "injected redis cluster client") -> None:
        super().__init__(client=client, description=description)

    @staticmethod
    def _channel(client: Any, description: str) -> ClientChannel:
        return ClientClusterChannel(client, description)
