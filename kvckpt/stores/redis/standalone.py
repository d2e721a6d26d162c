"""KVStore over one standalone Redis server (``redis://``, ``rediss://``, ``redis+unix://``).

The operations are kvckpt.stores.redis.operations'; here they travel over kvckpt's RESP transport
(kvckpt.stores.redis.transport) and its one retry policy. A client object the caller injects is
another channel (kvckpt.stores.redis.client).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from kvckpt.errors import InvalidCheckpointIdError
from kvckpt.store import Buffer, RangeRead
from kvckpt.stores.redis.commands import Command, ms, scan_pages, settings_of
from kvckpt.stores.redis.failures import TO_CLUSTER
from kvckpt.stores.redis.operations import Channel, RedisOperations, Server
from kvckpt.stores.redis.options import Options
from kvckpt.stores.redis.replicas import WaitOne
from kvckpt.stores.redis.retry import RetryPolicy
from kvckpt.stores.redis.transport import Endpoint, Reply, Transport, raise_first
from kvckpt.stores.redis.url import parse_standalone_url
from kvckpt.urls import StoreURL


class TransportChannel(Channel):
    """Commands to one server over kvckpt's RESP transport: values leave from and land in the
    caller's memory."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.description = transport.where
        self._kind_checked = False

    @property
    def timeout(self) -> float | None:
        return self.transport.policy.timeout

    def commands(self, commands: Sequence[Command], what: str) -> list[Reply]:
        return self.transport.execute(commands, what)

    def once(self, command: Command, key: str) -> Reply:
        return self.transport.once(command)

    def time(self, key: str) -> Reply:
        return self.transport.execute([("TIME",)], "reading the server's clock")[0]

    def write(self, items: Sequence[tuple[str, Buffer]], ttl: float | None) -> None:
        expiry = ms(ttl) if ttl is not None else None
        raise_first(self.transport.run(lambda conn: conn.set_many(items, expiry), "writing"))

    def read_into(self, reads: Sequence[RangeRead]) -> list[int]:
        counts = raise_first(self.transport.run(lambda conn: conn.getrange_into(reads), "reading"))
        return [n for n in counts if isinstance(n, int)]

    def scan(self, pattern: str) -> Iterator[Reply]:
        self._refuse_a_cluster_node()
        yield from scan_pages(lambda c: self.transport.execute(c, "listing keys"), pattern)

    def _refuse_a_cluster_node(self) -> None:
        """Every other command on a Cluster node answers MOVED for keys elsewhere, but SCAN lists only
        that node's keys, silently: ``kvckpt ls`` would show part of the checkpoints. So a listing asks
        first (once per store); a user whose ACL denies CLUSTER MYID is not asked again."""
        if self._kind_checked:
            return
        (reply,) = self.transport.run(lambda conn: conn.execute([("CLUSTER", "MYID")]), "listing keys")
        if isinstance(reply, bytes | str):
            raise InvalidCheckpointIdError(
                f"{self.description} {TO_CLUSTER} (listing keys of one node would miss the others')"
            )
        self._kind_checked = True

    def servers(self) -> list[Server]:
        def config_get() -> dict[str, str]:
            return settings_of(
                self.transport.execute([("CONFIG", "GET", "maxmemory*")], "reading server settings")[0]
            )

        return [(self.description, config_get)]

    def wait_each(self, wait: WaitOne, fence_key: str | None) -> dict[str | None, int]:
        def run(commands: list[tuple[Any, ...]]) -> list[Any]:
            return self.transport.execute(commands, "waiting for replicas")

        return {None: wait(run, fence_key)}

    def close(self) -> None:
        self.transport.close()


class RedisStore(RedisOperations):
    """KVStore over one Redis server, on connections it opens itself."""

    parse_url = staticmethod(parse_standalone_url)
    #: The options ``from_url`` takes (kvckpt.target checks them before anything connects).
    store_options = Options

    def __init__(self, endpoint: Endpoint, policy: RetryPolicy, description: str) -> None:
        self.endpoint = endpoint
        self.policy = policy
        super().__init__(TransportChannel(Transport(endpoint, policy, description)))

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> RedisStore:
        """``options`` are kvckpt.stores.redis.options.Options; any other redis-py option needs a
        redis-py client of your own (``client=``)."""
        settings = Options(**options)
        host, port = url.hosts[0] if url.hosts else ("", 0)
        unix_path = url.socket_path if url.scheme == "redis+unix" else None
        endpoint = settings.endpoint(url, host=host, port=port, unix_path=unix_path, db=url.db or 0)
        return cls(endpoint, settings.policy(), str(url.server))

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "policy": self.policy, "description": self.description}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]
