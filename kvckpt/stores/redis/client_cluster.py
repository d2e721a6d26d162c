"""KVStore over a ``redis.RedisCluster`` the caller passes in: redis-py routes, kvckpt only sends.

The client keeps its own connections, slot table and retry policy. Batches go through its pipeline,
which groups commands by node and follows redirections; a commit goes to the key's primary as a plain
``redis.Redis``, so it is sent once and can be fenced (kvckpt.stores.redis.client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kvckpt._buffers import key_str
from kvckpt.stores.redis.client import ClientStore, pipeline_runner
from kvckpt.stores.redis.common import check_wait_args, fewest_acks, glob_escape, wait_on
from kvckpt.stores.redis.slots import colocated_key, fence_key_on, key_slot


class ClientClusterStore(ClientStore):
    """KVStore over an injected ``redis.RedisCluster``."""

    cluster = True

    def __init__(self, *, client: Any, description: str = "injected redis cluster client") -> None:
        super().__init__(client=client, description=description)

    def _commit_client(self, key: str) -> Any:
        client = self.client
        return client.get_redis_connection(client.nodes_manager.get_node_from_slot(key_slot(key)))

    def colocated(self, key: str, anchor: str) -> str:
        return colocated_key(key, anchor)

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        pattern = glob_escape(prefix) + "*"
        seen: set[str] = set()
        with self._errors("listing keys"):
            for node in self.client.get_primaries():
                for raw in self.client.get_redis_connection(node).scan_iter(match=pattern, count=1000):
                    key = key_str(raw)
                    if key.startswith(prefix) and key not in seen:
                        seen.add(key)
                        yield key

    def _servers(self) -> list[tuple[str, Any]]:
        client = self.client
        return [
            (f"{self.description} node {n.name}", client.get_redis_connection(n)) for n in client.get_nodes()
        ]

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """WAIT on every primary (the client does not say which ones took this store's writes)."""
        check_wait_args(replicas, timeout)
        acks: dict[str, int] = {}
        with self._errors("waiting for replicas"):
            client = self.client
            owner = client.nodes_manager.get_node_from_slot

            def owned_by(name: str) -> Callable[[int], bool]:
                return lambda slot: bool(owner(slot).name == name)

            for node in client.get_primaries():
                fence = fence_key_on(fence_key, owned_by(node.name))
                run = pipeline_runner(client.get_redis_connection(node))
                acks[node.name] = wait_on(run, replicas, timeout, fence, self._reply_timeout())
        return fewest_acks(self.description, acks, replicas, timeout)
