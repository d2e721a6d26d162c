"""Redis backend: standalone (TCP, TLS, unix socket) or any injected redis-py-compatible client.

On connections it opens itself over TCP or a unix socket, the bulk operations (put_many,
read_into_many, expire_many, delete_many) go through kvckpt.stores.resp: values are sent from and
received into the caller's memory. Everything else, and every operation over TLS or an injected
client, goes through redis-py, whose pure-Python packer sends memoryviews without copying (hiredis'
packer copies every argument: ~10x slower for 4 MiB chunks).
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
from kvckpt.stores.resp import Arg, Endpoint, RespPool
from kvckpt.urls import StoreURL

REDIS_MAX_VALUE = 512 * 1024 * 1024
PASSWORD_ENV = "REDISCLI_AUTH"


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


class RedisStore(KVStore):
    """KVStore over one Redis server (or a client the caller passes in)."""

    capabilities = Capabilities(max_value_bytes=REDIS_MAX_VALUE, native_ranges=True, ttl=True)

    def __init__(
        self,
        *,
        client: Any = None,
        client_kwargs: dict[str, Any] | None = None,
        description: str = "injected redis client",
        endpoint: Endpoint | None = None,
        retries: int = 2,
    ) -> None:
        if client is None and client_kwargs is None:
            raise TypeError("RedisStore needs client= or client_kwargs=")
        self._client = client
        self._injected = client is not None
        self._client_kwargs = client_kwargs or {}
        self.description = description
        self._lock = threading.Lock()
        #: The RESP fast path for bulk operations, when this store opens its own plain sockets.
        self._endpoint = endpoint
        self._retries = retries
        self._fast = None if endpoint is None else RespPool(endpoint, retries)

    @classmethod
    def from_url(
        cls,
        url: StoreURL,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        retries: int = 2,
        password: str | None = None,
        fast_path: bool = True,
        **client_kwargs: Any,
    ) -> RedisStore:
        """``timeout`` bounds each reply; ``retries`` re-sends idempotent commands on a dropped link.

        ``fast_path=False``, TLS, or any extra redis-py option keeps bulk I/O on redis-py too.
        """
        secret = password or url.password or os.environ.get(PASSWORD_ENV) or None
        endpoint = None
        if fast_path and url.scheme in ("redis", "redis+unix") and not client_kwargs:
            (host, port), *_ = url.hosts or (("", 0),)
            endpoint = Endpoint(
                host=host,
                port=port,
                unix_path=url.socket_path if url.scheme == "redis+unix" else None,
                db=url.db,
                username=url.username,
                password=secret,
                timeout=timeout,
                connect_timeout=connect_timeout,
            )
        kwargs: dict[str, Any] = {
            "db": url.db,
            "username": url.username,
            "password": secret,
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
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
        return cls(client_kwargs=kwargs, description=str(url.server), endpoint=endpoint, retries=retries)

    # Connection lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:  # I/O threads connect lazily at once: a second client would close the first
                if self._client is None:
                    self._client = redis.Redis(**self._client_kwargs)
        return self._client

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
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
        state["_client"] = state["_fast"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
        if self._endpoint is not None:
            self._fast = RespPool(self._endpoint, self._retries)

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
        if self._fast is not None:
            with self._errors("reading"):
                return self._fast.getrange_into(reads)
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
        if self._fast is not None:
            with self._errors("writing"):
                self._fast.set_many(items, px)
            return
        with self._errors("writing"):
            pipe = self._pipeline()
            for key, value in items:
                pipe.set(key, as_bytes_view(value), px=px)
            pipe.execute()

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        px = _ms(ttl) if ttl is not None else None
        with self._errors("writing"):
            return bool(self.client.set(key, as_bytes_view(value), nx=create, px=px))

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        px = _ms(ttl) if ttl is not None else None
        with self._errors("writing"):
            previous: bytes | None = self.client.set(key, as_bytes_view(value), get=True, px=px)
            return previous

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        if not keys:
            return []
        with self._errors("setting expiry"):
            if self._fast is not None:
                commands: list[tuple[Arg, ...]] = (
                    [(c, key) for key in keys for c in ("PERSIST", "EXISTS")]
                    if ttl is None
                    else [("PEXPIRE", key, _ms(ttl)) for key in keys]
                )
                replies = self._fast.execute(commands)
            else:
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
            if self._fast is not None:
                self._fast.execute([("UNLINK", key) for key in keys])
                return
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
