"""KVStore over a redis-py-compatible client object the caller passes in (redis.Redis, fakeredis, …).

The operations are kvckpt.stores.redis.operations'; here they travel through the client, which keeps
its own connections and retry policy. An injected ``redis.RedisCluster`` gets the channel of
client_cluster.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis.exceptions as rex

from kvckpt.errors import KVCheckpointError, StoreUnavailableError
from kvckpt.stores.redis.commands import Command, Conditional, as_bytes_view, str_of
from kvckpt.stores.redis.fencing import send_once
from kvckpt.stores.redis.operations import Channel, RedisOperations, Server
from kvckpt.stores.redis.replicas import Run, WaitOne
from kvckpt.stores.redis.transport import Arg, Reply

#: WATCH rounds a conditional step tries while other writers keep changing its keys.
WATCH_ATTEMPTS = 16


def socket_timeout_of(client: Any) -> float | None:
    """The reply timeout a redis-py client was built with, if it tells."""
    with contextlib.suppress(AttributeError):
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        return float(timeout) if timeout else None
    return None


def pipeline_runner(client: Any) -> Run:
    """Send commands as one pipeline on ``client`` (a cluster client's routes them per node)."""

    def run(commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*map(as_bytes_view, command))
        return list(pipe.execute())

    return run


def _connection_id(conn: Any) -> int | None:
    """The server's id for this connection, to fence it later; None where CLIENT is not allowed."""
    try:
        conn.send_command("CLIENT", "ID")
        return int(conn.read_response())
    except rex.ResponseError:
        return None


class ClientChannel(Channel):
    """Commands through an injected redis-py-compatible client: batches as pipelines, and the
    conditional steps as WATCH + MULTI/EXEC (the client's server may be fakeredis, without Lua)."""

    def __init__(self, client: Any, description: str) -> None:
        self.client = client
        self.description = description
        self._run = pipeline_runner(client)

    @property
    def timeout(self) -> float | None:
        return socket_timeout_of(self.client)

    def owner(self, key: str) -> Any:
        """The client a command on ``key`` alone goes through (a Cluster's: the key's primary)."""
        return self.client

    def commands(self, commands: Sequence[Command], what: str) -> list[Reply]:
        return self._run(list(commands))

    def once(self, command: Command, key: str) -> Reply:
        """Sent on one of the client's connections, bypassing its retry (kvckpt.stores.redis.fencing)."""
        client = self.owner(key)
        args = tuple(map(as_bytes_view, command))
        # redis-py turns SET's reply into a bool unless told the command has GET.
        options = {"get": True} if "GET" in args[3:] else {}
        pool = getattr(client, "connection_pool", None)
        if pool is None:  # not a redis.Redis: its own retry policy applies
            return client.execute_command(*args, **options)  # type: ignore[no-any-return]
        conn = pool.get_connection()
        try:

            def send() -> Reply:
                conn.send_command(*args)
                return client.parse_response(conn, args[0], **options)  # type: ignore[no-any-return]

            def kill(conn_id: int) -> None:
                client.execute_command("CLIENT", "KILL", "ID", conn_id)

            return send_once(lambda: _connection_id(conn), send, conn.disconnect, kill)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def conditional(self, step: Conditional, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        """``step.watched`` on the key's primary, again while another writer changes the keys."""
        values = [as_bytes_view(a) for a in args]
        for _ in range(WATCH_ATTEMPTS):
            with self.owner(keys[0]).pipeline(transaction=True) as pipe:
                try:
                    return step.watched(pipe, keys, values)
                except rex.WatchError:
                    continue
        raise StoreUnavailableError(f"{self.description}: {keys[0]!r} kept changing {step.contended}")

    def time(self, key: str) -> Reply:
        return self.owner(key).time()  # type: ignore[no-any-return]

    def scan(self, pattern: str) -> Iterator[Reply]:
        yield from self.client.scan_iter(match=pattern, count=1000)

    def nodes(self) -> list[tuple[str, Any]]:
        """(name, client) for every server whose settings matter; a cluster lists each node."""
        return [(self.description, self.client)]

    def servers(self) -> list[Server]:
        def getter(client: Any) -> Any:
            return lambda: {str_of(k): str_of(v) for k, v in client.config_get("maxmemory*").items()}

        return [(name, getter(client)) for name, client in self.nodes()]

    def wait_each(self, wait: WaitOne, fence_key: str | None) -> dict[str | None, int]:
        return {None: wait(self._run, fence_key)}

    def close(self) -> None:
        """An injected client is the caller's to close."""


class ClientStore(RedisOperations):
    """KVStore over a redis-py-compatible client: every command goes through ``self.client``."""

    channel: ClientChannel

    def __init__(self, *, client: Any, description: str = "injected redis client") -> None:
        super().__init__(self._channel(client, description))

    @staticmethod
    def _channel(client: Any, description: str) -> ClientChannel:
        return ClientChannel(client, description)

    @property
    def client(self) -> Any:
        return self.channel.client

    def __getstate__(self) -> dict[str, Any]:
        raise KVCheckpointError(
            "a store built on an injected client cannot be pickled (a process-based async_save "
            "pickles the writer); pass a redis:// URL instead of client="
        )
