"""KVStore over one standalone Redis server (``redis://``, ``rediss://``, ``redis+unix://``).

Every operation goes through kvckpt's RESP transport (kvckpt.stores.redis.transport) and its one
retry policy; a client object the caller injects goes through kvckpt.stores.redis.client instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from kvckpt.errors import InvalidCheckpointIdError, ReplicationError
from kvckpt.store import Buffer, RangeRead
from kvckpt.stores.redis import common
from kvckpt.stores.redis.base import Command, Options, RespStore, read_settings, scan_keys
from kvckpt.stores.redis.common import (
    TO_CLUSTER,
    check_settings,
    check_wait_args,
    glob_escape,
    replication_message,
    translated,
    wait_on,
)
from kvckpt.stores.redis.retry import RetryPolicy
from kvckpt.stores.redis.transport import Endpoint, Reply, Transport, raise_first
from kvckpt.stores.redis.url import parse_standalone_url
from kvckpt.urls import StoreURL


class RedisStore(RespStore):
    """KVStore over one Redis server, on connections it opens itself."""

    parse_url = staticmethod(parse_standalone_url)

    def __init__(self, endpoint: Endpoint, policy: RetryPolicy, description: str) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self.description = description
        self._transport = Transport(endpoint, policy, description)
        self._kind_checked = False

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> RedisStore:
        """``options`` are kvckpt.stores.redis.base.Options; any other redis-py option needs a redis-py
        client of your own (``client=``)."""
        settings = Options(**options)
        host, port = url.hosts[0] if url.hosts else ("", 0)
        unix_path = url.socket_path if url.scheme == "redis+unix" else None
        endpoint = settings.endpoint(url, host=host, port=port, unix_path=unix_path, db=url.db or 0)
        return cls(endpoint, settings.policy(), str(url.server))

    def close(self) -> None:
        self._transport.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "policy": self.policy, "description": self.description}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _errors(self, action: str) -> Any:
        return translated(self.description, action, self.policy.timeout)

    def _commands(self, commands: Sequence[Command], what: str) -> list[Reply]:
        return self._transport.execute(commands, what)

    def _once(self, command: Command, key: str) -> Reply:
        return self._transport.once(command)

    def _time(self, key: str) -> Reply:
        return self._transport.execute([("TIME",)], "reading the server's clock")[0]

    # KVStore --------------------------------------------------------------------------------

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        if not any(len(r.into) for r in reads):
            return [0] * len(reads)
        with self._errors("reading"):
            counts = raise_first(self._transport.run(lambda conn: conn.getrange_into(reads), "reading"))
        return [n for n in counts if isinstance(n, int)]

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        if not items:
            return
        expiry = common.ms(ttl) if ttl is not None else None
        with self._errors("writing"):
            raise_first(self._transport.run(lambda conn: conn.set_many(items, expiry), "writing"))

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        with self._errors("listing keys"):
            self._refuse_a_cluster_node()
            yield from scan_keys(
                lambda c: self._transport.execute(c, "listing keys"), prefix, glob_escape(prefix) + "*"
            )

    def _refuse_a_cluster_node(self) -> None:
        """Every other command on a Cluster node answers MOVED for keys elsewhere, but SCAN lists only
        that node's keys, silently: ``kvckpt ls`` would show part of the checkpoints. So a listing asks
        first (once per store); a user whose ACL denies CLUSTER MYID is not asked again."""
        if self._kind_checked:
            return
        (reply,) = self._transport.run(lambda conn: conn.execute([("CLUSTER", "MYID")]), "listing keys")
        if isinstance(reply, bytes | str):
            raise InvalidCheckpointIdError(
                f"{self.description} {TO_CLUSTER} (listing keys of one node would miss the others')"
            )
        self._kind_checked = True

    # Server safety (called by the DCP adapter around a save) ----------------------------------

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse a server that may evict checkpoint keys (common.check_settings); returns its policy."""
        with self._errors("reading server settings"):
            return check_settings(
                [(self.description, lambda: read_settings(self._transport))], allow_eviction
            )

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """Block until ``replicas`` replicas hold every write made so far (Redis WAIT).

        Returns how many acknowledged; raises ReplicationError when fewer did within ``timeout``
        seconds, because a failover now could lose acknowledged writes. ``fence_key`` (a key the
        caller may write, e.g. under its namespace) makes WAIT cover every connection's writes.
        """
        check_wait_args(replicas, timeout)

        def run(commands: list[tuple[Any, ...]]) -> list[Any]:
            return self._transport.execute(commands, "waiting for replicas")

        with self._errors("waiting for replicas"):
            acked = wait_on(run, replicas, timeout, fence_key, self.policy.timeout)
        if acked < replicas:
            raise ReplicationError(
                replication_message(self.description, acked, replicas, timeout), acked=acked, wanted=replicas
            )
        return acked
