"""Redis backend: standalone (TCP, TLS, unix socket) or any injected redis-py-compatible client.

Large values go out as memoryviews through redis-py's pure-Python command packer, which hands them to
``sendall`` without copying (hiredis' packer copies every argument: ~10x slower for 4 MiB chunks).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import redis.exceptions as rex
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from kvckpt.errors import (
    KVCheckpointError,
    StoreFullError,
    StoreUnavailableError,
)
from kvckpt.store import Buffer, Capabilities, KVStore, RangeRead
from kvckpt.urls import StoreURL

REDIS_MAX_VALUE = 512 * 1024 * 1024
PASSWORD_ENV = "REDISCLI_AUTH"
_CLIENT_LOCK = threading.Lock()


def glob_escape(text: str) -> str:
    """Make ``text`` literal inside a Redis MATCH pattern (Redis escapes with backslash)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def as_bytes_view(value: Buffer) -> Buffer:
    """A 1-D byte view: redis-py measures arguments with len(), which counts items, not bytes."""
    if isinstance(value, memoryview) and (value.ndim != 1 or value.itemsize != 1):
        return value.cast("B")
    return value


def _ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))


def _px(ms: int | None) -> list[Any]:
    return [] if ms is None else ["PX", ms]


def _connection_id(conn: Any) -> int | None:
    """The server's id for this connection, to fence it later; None where CLIENT is not allowed."""
    try:
        conn.send_command("CLIENT", "ID")
        return int(conn.read_response())
    except rex.ResponseError:
        return None


class RedisStore(KVStore):
    """KVStore over one Redis server (or a client the caller passes in)."""

    capabilities = Capabilities(max_value_bytes=REDIS_MAX_VALUE, native_ranges=True, ttl=True)

    def __init__(
        self,
        *,
        client: Any = None,
        client_kwargs: dict[str, Any] | None = None,
        description: str = "injected redis client",
    ) -> None:
        if client is None and client_kwargs is None:
            raise TypeError("RedisStore needs client= or client_kwargs=")
        self._client = client
        self._injected = client is not None
        self._client_kwargs = client_kwargs or {}
        self.description = description

    @classmethod
    def from_url(
        cls,
        url: StoreURL,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        retries: int = 2,
        backoff: float = 0.05,
        backoff_cap: float = 1.0,
        password: str | None = None,
        **client_kwargs: Any,
    ) -> RedisStore:
        """``timeout`` bounds each reply; ``retries`` re-sends idempotent commands on a dropped link,
        waiting ``backoff`` seconds, doubling up to ``backoff_cap``. Commits are never re-sent."""
        kwargs: dict[str, Any] = {
            "db": url.db,
            "username": url.username,
            "password": password or url.password or os.environ.get(PASSWORD_ENV) or None,
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(ExponentialBackoff(cap=backoff_cap, base=backoff), retries),
            "health_check_interval": 0,
        }
        if url.scheme == "redis+unix":
            kwargs["unix_socket_path"] = url.socket_path
        else:
            (host, port), *_ = url.hosts
            kwargs.update(host=host, port=port)
            kwargs["socket_keepalive"] = True
        if url.scheme == "rediss":
            kwargs["ssl"] = True
        kwargs.update(client_kwargs)
        return cls(client_kwargs=kwargs, description=str(url.server))

    # Connection lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            # I/O threads race here; a second client would be garbage-collected, and its __del__
            # would close the pool under the thread still using it.
            with _CLIENT_LOCK:
                if self._client is None:
                    self._client = redis.Redis(**self._client_kwargs)
        return self._client

    def close(self) -> None:
        if self._client is not None and not self._injected:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        if self._injected:
            raise KVCheckpointError(
                "a store built on an injected client cannot be pickled (a process-based async_save "
                "pickles the writer); pass a redis:// URL instead of client="
            )
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate redis-py exceptions into kvckpt's types by class, never by message text."""
        try:
            yield
        except rex.OutOfMemoryError as exc:
            raise StoreFullError(
                f"{self.description}: Redis is out of memory while {action} (maxmemory reached); "
                "free memory or raise maxmemory, and use maxmemory-policy noeviction"
            ) from exc
        except rex.AuthenticationError as exc:
            raise StoreUnavailableError(
                f"{self.description}: authentication failed while {action}; check user and password"
            ) from exc
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise StoreUnavailableError(
                f"{self.description}: cannot reach Redis while {action} ({type(exc).__name__}); "
                "check the server is up and the URL, or raise timeout="
            ) from exc
        except rex.RedisError as exc:
            raise KVCheckpointError(f"{self.description}: Redis error while {action}: {exc}") from exc

    def _pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    # KVStore --------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("reading"):
            pipe = self._pipeline()
            for key in keys:
                pipe.get(key)
            return list(pipe.execute())

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        copied = [0] * len(reads)
        todo = [i for i, r in enumerate(reads) if len(r.into)]
        if not todo:
            return copied
        with self._errors("reading"):
            pipe = self._pipeline()
            for i in todo:
                r = reads[i]
                pipe.getrange(r.key, r.offset, r.offset + r.into.nbytes - 1)
            for i, data in zip(todo, pipe.execute(), strict=True):
                into = reads[i].into.cast("B") if reads[i].into.format != "B" else reads[i].into
                n = min(len(data), into.nbytes)
                into[:n] = data[:n]
                copied[i] = n
        return copied

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        if not items:
            return
        px = _ms(ttl) if ttl is not None else None
        with self._errors("writing"):
            pipe = self._pipeline()
            for key, value in items:
                pipe.set(key, as_bytes_view(value), px=px)
            pipe.execute()

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        px = _ms(ttl) if ttl is not None else None
        with self._errors("writing"):
            if create:  # a commit: sent once, see _once
                return bool(self._once("SET", key, as_bytes_view(value), "NX", *_px(px)))
            return bool(self.client.set(key, as_bytes_view(value), px=px))

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        px = _ms(ttl) if ttl is not None else None
        with self._errors("writing"):
            previous: bytes | None = self._once("SET", key, as_bytes_view(value), "GET", *_px(px), get=True)
            return previous

    def _once(self, *args: Any, **options: Any) -> Any:
        """Send a commit exactly once, bypassing the client's retry, and fence it if the reply is lost.

        redis-py re-sends any command whose reply was lost, which is unsafe for a conditional commit
        (a re-sent swap can reinstate a record whose data another writer already retired). After a
        lost reply the connection is killed server-side (CLIENT KILL ID), so the commit either has
        run or never will, and the caller learns which by reading the record (docs/reliability.md).
        """
        client = self.client
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

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        if not keys:
            return []
        with self._errors("setting expiry"):
            pipe = self._pipeline()
            for key in keys:
                if ttl is None:
                    pipe.persist(key)
                    pipe.exists(key)
                else:
                    pipe.pexpire(key, _ms(ttl))
            replies = pipe.execute()
        if ttl is None:  # PERSIST is 0 for a key without expiry too: EXISTS decides
            return [bool(e) for e in replies[1::2]]
        return [bool(r) for r in replies]

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._errors("deleting"):
            pipe = self._pipeline()
            for key in keys:
                pipe.unlink(key)
            pipe.execute()

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        pattern = glob_escape(prefix) + "*"
        with self._errors("listing keys"):
            for raw in self.client.scan_iter(match=pattern, count=1000):
                key = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
                if key.startswith(prefix):
                    yield key
