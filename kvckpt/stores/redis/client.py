"""KVStore over a redis-py-compatible client object the caller passes in (redis.Redis, fakeredis, …).

The client keeps its own connections and retry policy; kvckpt only sends commands through it. An
injected ``redis.RedisCluster`` gets the subclass in client_cluster.py.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import redis.exceptions as rex

from kvckpt._buffers import key_str
from kvckpt.errors import KVCheckpointError, ReplicationError, StoreUnavailableError
from kvckpt.store import Buffer, Capabilities, Commit, KVStore, RangeRead
from kvckpt.stores.redis.common import (
    REDIS_MAX_VALUE,
    as_bytes_view,
    check_settings,
    check_wait_args,
    copy_replies,
    expiry_commands,
    expiry_results,
    glob_escape,
    ms,
    px,
    replication_message,
    str_of,
    translated,
    wait_on,
)

#: WATCH rounds a commit tries while other writers keep changing its keys.
_COMMIT_ATTEMPTS = 16


def socket_timeout_of(client: Any) -> float | None:
    """The reply timeout a redis-py client was built with, if it tells."""
    with contextlib.suppress(AttributeError):
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        return float(timeout) if timeout else None
    return None


def pipeline_runner(client: Any) -> Any:
    """Send commands as one pipeline on ``client`` (for common.wait_on)."""

    def run(commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())

    return run


def _connection_id(conn: Any) -> int | None:
    """The server's id for this connection, to fence it later; None where CLIENT is not allowed."""
    try:
        conn.send_command("CLIENT", "ID")
        return int(conn.read_response())
    except rex.ResponseError:
        return None


class ClientStore(KVStore):
    """KVStore over a redis-py-compatible client: every command goes through ``self.client``."""

    capabilities = Capabilities(
        max_value_bytes=REDIS_MAX_VALUE, native_ranges=True, ttl=True, conditional_commit=True
    )
    cluster = False

    def __init__(self, *, client: Any, description: str = "injected redis client") -> None:
        self._client = client
        self.description = description
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        return self._client

    def close(self) -> None:
        """An injected client is the caller's to close."""

    def __getstate__(self) -> dict[str, Any]:
        raise KVCheckpointError(
            "a store built on an injected client cannot be pickled (a process-based async_save "
            "pickles the writer); pass a redis:// URL instead of client="
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    def _errors(self, action: str) -> Any:
        return translated(self.description, action, self._reply_timeout(), cluster=self.cluster)

    def _reply_timeout(self) -> float | None:
        return socket_timeout_of(self._client)

    def _pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    def _run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Replies to ``commands`` in order, as one pipeline (a cluster client's routes per node)."""
        pipe = self._pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())

    # KVStore --------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("reading"):
            return self._run([("GET", key) for key in keys])

    def value_sizes(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        with self._errors("reading sizes"):
            return [int(n) for n in self._run([("STRLEN", key) for key in keys])]

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        copied = [0] * len(reads)
        todo = [i for i, r in enumerate(reads) if len(r.into)]
        if not todo:
            return copied
        with self._errors("reading"):
            commands = []
            for i in todo:
                r = reads[i]
                commands.append(("GETRANGE", r.key, r.offset, r.offset + r.into.nbytes - 1))
            copy_replies(reads, todo, self._run(commands), copied)
        return copied

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        if items:
            with self._errors("writing"):
                self._run([("SET", key, as_bytes_view(value), *px(ttl)) for key, value in items])

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        with self._errors("writing"):
            if create:  # a commit: sent once, see _once
                return bool(self._once("SET", key, as_bytes_view(value), "NX", *px(ttl)))
            return bool(self._run([("SET", key, as_bytes_view(value), *px(ttl))])[0])

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        with self._errors("writing"):
            previous: bytes | None = self._once("SET", key, as_bytes_view(value), "GET", *px(ttl), get=True)
            return previous

    def commit(
        self, key: str, value: Buffer, *, live_key: str, create: bool, ttl: float | None = None
    ) -> Commit:
        """The commit rule as WATCH + MULTI/EXEC on the key's primary: an injected client may be
        fakeredis, which has no Lua. A change to either key between the WATCH and the EXEC (another
        save's commit, a delete) makes EXEC do nothing, and the rule is checked again."""
        with self._errors("committing"):
            for _ in range(_COMMIT_ATTEMPTS):
                with self._commit_client(key).pipeline(transaction=True) as pipe:
                    pipe.watch(live_key, key)
                    if not pipe.exists(live_key):
                        return Commit(written=False, alive=False)
                    previous = None if create else pipe.get(key)
                    if create and pipe.exists(key):
                        return Commit(written=False, alive=True)
                    pipe.multi()
                    pipe.set(key, as_bytes_view(value), px=None if ttl is None else ms(ttl))
                    pipe.unlink(live_key)
                    try:
                        pipe.execute()
                    except rex.WatchError:
                        continue
                    return Commit(written=True, alive=True, previous=previous)
        raise StoreUnavailableError(
            f"{self.description}: {key!r} kept changing while committing; nothing was committed"
        )

    def delete_if(self, key: str, expected: Buffer) -> bool:
        """WATCH the key, compare, and UNLINK in MULTI/EXEC (fakeredis has no Lua)."""
        with self._errors("deleting"):
            for _ in range(_COMMIT_ATTEMPTS):
                with self._commit_client(key).pipeline(transaction=True) as pipe:
                    pipe.watch(key)
                    if pipe.get(key) != bytes(as_bytes_view(expected)):
                        return False
                    pipe.multi()
                    pipe.unlink(key)
                    try:
                        pipe.execute()
                    except rex.WatchError:
                        continue
                    return True
        raise StoreUnavailableError(f"{self.description}: {key!r} kept changing while deleting it")

    def clock(self, key: str) -> float:
        with self._errors("reading the server's clock"):
            seconds, micros = self._commit_client(key).time()
        return int(seconds) + int(micros) / 1e6

    def _commit_client(self, key: str) -> Any:
        """The client a commit of ``key`` goes through (a Cluster sends it to the key's primary)."""
        return self.client

    def _once(self, *args: Any, **options: Any) -> Any:
        """Send a commit exactly once, bypassing the client's retry, and fence it if the reply is lost.

        As kvckpt.stores.redis.transport.Transport.once does, over a redis-py connection.
        """
        client = self._commit_client(str(args[1]))
        pool = getattr(client, "connection_pool", None)
        if pool is None:  # not a redis.Redis: its own retry policy applies
            return client.execute_command(*args, **options)
        conn = pool.get_connection()
        try:
            conn_id = _connection_id(conn)  # a failure here is before anything was sent
            try:
                conn.send_command(*args)
                return client.parse_response(conn, args[0], **options)
            except (rex.ConnectionError, rex.TimeoutError):
                conn.disconnect()
                if conn_id is not None:
                    with contextlib.suppress(rex.RedisError):
                        client.execute_command("CLIENT", "KILL", "ID", conn_id)
                raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def take(self, key: str) -> bytes | None:
        with self._errors("deleting"):
            value: bytes | None = self.client.getdel(key)
            return value

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        if not keys:
            return []
        with self._errors("setting expiry"):
            return expiry_results(self._run(expiry_commands(keys, ttl)), ttl)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            with self._errors("deleting"):  # one UNLINK per key: a multi-key UNLINK cannot cross slots
                self._run([("UNLINK", key) for key in keys])

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        with self._errors("listing keys"):
            for raw in self.client.scan_iter(match=glob_escape(prefix) + "*", count=1000):
                key = key_str(raw)
                if key.startswith(prefix):
                    yield key

    # Server safety --------------------------------------------------------------------------

    def _servers(self) -> list[tuple[str, Any]]:
        """(name, client) for every server whose settings matter; a cluster lists each node."""
        return [(self.description, self.client)]

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse a server that may evict checkpoint keys (common.check_settings)."""

        def getter(client: Any) -> Any:
            return lambda: {str_of(k): str_of(v) for k, v in client.config_get("maxmemory*").items()}

        with self._errors("reading server settings"):
            return check_settings(
                [(name, getter(client)) for name, client in self._servers()], allow_eviction
            )

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """As RedisStore.wait_for_replicas, through the client."""
        check_wait_args(replicas, timeout)
        with self._errors("waiting for replicas"):
            run = pipeline_runner(self.client)
            acked = wait_on(run, replicas, timeout, fence_key, socket_timeout_of(self.client))
        if acked < replicas:
            raise ReplicationError(
                replication_message(self.description, acked, replicas, timeout), acked=acked, wanted=replicas
            )
        return acked
