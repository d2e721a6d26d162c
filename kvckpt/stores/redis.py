"""Redis backend: standalone (TCP, TLS, unix socket) or any injected redis-py-compatible client.

On connections it opens itself over TCP or a unix socket, the bulk operations (put_many,
read_into_many, expire_many, delete_many) go through kvckpt.stores.resp: values are sent from and
received into the caller's memory. Everything else, and every operation over TLS or an injected
client, goes through redis-py, whose pure-Python packer sends memoryviews without copying (hiredis'
packer copies every argument: ~10x slower for 4 MiB chunks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import redis.exceptions as rex
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from kvckpt.errors import (
    KVCheckpointError,
    ReplicationError,
    StoreFullError,
    StoreUnavailableError,
    UnsafeStoreConfigError,
    UnsafeStoreConfigWarning,
)
from kvckpt.store import Buffer, Capabilities, KVStore, RangeRead
from kvckpt.stores.resp import Arg, Endpoint, RespPool
from kvckpt.urls import StoreURL, tls_of

logger = logging.getLogger(__name__)

REDIS_MAX_VALUE = 512 * 1024 * 1024
PASSWORD_ENV = "REDISCLI_AUTH"
#: The only maxmemory-policy under which Redis never drops a key it acknowledged.
SAFE_MAXMEMORY_POLICY = "noeviction"
#: The least an ACL user needs (``ACL SETUSER name on >password ~NAMESPACE/* -@all`` + these);
#: ``config|get`` only serves check_server_settings, which skips quietly without it. Commit fencing
#: after a lost reply also needs ``+client|id +client|kill``; without them commits are sent once, unfenced.
ACL_RULES = (
    "+get", "+set", "+getrange", "+getdel", "+pexpire", "+persist", "+exists", "+unlink", "+scan", "+ping",
    "+wait", "+strlen",
    "+config|get",
)  # fmt: skip


def glob_escape(text: str) -> str:
    """Make ``text`` literal inside a Redis MATCH pattern (Redis escapes with backslash)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def as_bytes_view(value: Buffer) -> Buffer:
    """A 1-D byte view: redis-py measures arguments with len(), which counts items, not bytes."""
    if isinstance(value, memoryview) and (value.ndim != 1 or value.itemsize != 1):
        return value.cast("B")
    return value


def copy_replies(
    reads: Sequence[RangeRead], todo: list[int], replies: list[bytes], copied: list[int]
) -> None:
    """Copy each GETRANGE reply into its read's buffer; a short reply means a missing or short value."""
    for i, data in zip(todo, replies, strict=True):
        into = reads[i].into.cast("B") if reads[i].into.format != "B" else reads[i].into
        n = min(len(data), into.nbytes)
        into[:n] = data[:n]
        copied[i] = n


def _ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))


def tls_options(url: StoreURL) -> dict[str, Any]:
    """redis-py's TLS keywords for the URL's TLS settings (see ``urls.tls_of``)."""
    tls = tls_of(url)
    if tls is None:
        return {}
    files = {"ssl_ca_certs": tls.ca, "ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
    return {"ssl": True, **{name: path for name, path in files.items() if path}}


def password_of(url: StoreURL, password: str | None) -> str | None:
    """The password: given explicitly, else in the URL, else in REDISCLI_AUTH (as redis-cli reads it)."""
    return password or url.password or os.environ.get(PASSWORD_ENV) or None


def connection_kwargs(
    url: StoreURL, password: str | None, timeout: float, connect_timeout: float, retry: Retry
) -> dict[str, Any]:
    """redis-py keywords every kvckpt connection shares, standalone or Cluster, TLS included."""
    return {
        "username": url.username,
        "password": password,
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": retry,
        "health_check_interval": 0,
        **tls_options(url),
    }


def socket_timeout_of(client: Any) -> float | None:
    """The reply timeout a redis-py client was built with, if it tells."""
    with contextlib.suppress(AttributeError):
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        return float(timeout) if timeout else None
    return None


def wait_on(client: Any, replicas: int, timeout: float, fence_key: str | None = None) -> int:
    """Redis ``WAIT`` on one server: how many replicas acknowledged every write made before the call.

    WAIT waits for the replication offset of the *connection* it runs on, as of that connection's last
    write (Redis 7.2+ moves it only on commands that propagate; older servers on any command). A
    pooled connection may not have carried our writes, so a small write to ``fence_key`` (removed
    right after, and expiring in a minute anyway) goes first on the same connection: its offset then
    covers every write any connection made before. Without a fence key a PING does that on servers
    before 7.2. Long timeouts are cut into slices shorter than the socket timeout so the reply never
    times out.
    """
    deadline = time.monotonic() + timeout
    socket_timeout = socket_timeout_of(client)
    step = socket_timeout * 0.8 if socket_timeout else timeout
    while True:
        remaining = deadline - time.monotonic()
        pipe = client.pipeline(transaction=False)
        if fence_key is None:
            pipe.execute_command("PING")
        else:
            pipe.execute_command("SET", fence_key, b"wait", "PX", 60_000)
        pipe.execute_command("WAIT", replicas, max(1, int(min(remaining, step) * 1000)))
        if fence_key is not None:
            pipe.execute_command("UNLINK", fence_key)
        acked = int(pipe.execute()[1])
        if acked >= replicas or time.monotonic() >= deadline:
            return acked


def eviction_problem(where: str, settings: dict[str, str]) -> str | None:
    """Why ``settings`` (a CONFIG GET reply) can lose checkpoint keys, or None when they cannot.

    Any policy but noeviction is refused even with maxmemory 0 (no limit today): maxmemory can be set
    at runtime (CONFIG SET, a managed service's resize), and eviction then drops chunks of committed
    checkpoints silently. volatile-* policies are no safer: they evict the keys kvckpt gives a TTL,
    the previous generation that readers may still be loading.
    """
    policy = settings.get("maxmemory-policy", SAFE_MAXMEMORY_POLICY)
    if policy == SAFE_MAXMEMORY_POLICY:
        return None
    limit = settings.get("maxmemory", "?")
    return (
        f"{where}: maxmemory-policy is {policy!r} (maxmemory {limit}): when memory runs short Redis "
        "silently evicts keys, which can leave a committed checkpoint whose chunks are gone. Set "
        "'maxmemory-policy noeviction' so a full server refuses writes instead (kvckpt then raises "
        "StoreFullError), or pass allow_eviction=True to accept the risk"
    )


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

    def __new__(cls, *args: Any, **kwargs: Any) -> RedisStore:
        """An injected ``redis.RedisCluster`` is routed to RedisClusterStore (per-node batches)."""
        if cls is RedisStore and isinstance(kwargs.get("client"), redis.cluster.RedisCluster):
            from kvckpt.stores.redis_cluster import RedisClusterStore

            cls = RedisClusterStore
        return super().__new__(cls)

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
        backoff: float = 0.05,
        backoff_cap: float = 1.0,
        password: str | None = None,
        fast_path: bool = True,
        **client_kwargs: Any,
    ) -> RedisStore:
        """``timeout`` bounds each reply; ``retries`` re-sends idempotent commands on a dropped link,
        waiting ``backoff`` seconds, doubling up to ``backoff_cap``. Commits are never re-sent.

        ``fast_path=False``, TLS, or any extra redis-py option keeps bulk I/O on redis-py too.
        """
        secret = password_of(url, password)
        retry = Retry(ExponentialBackoff(cap=backoff_cap, base=backoff), retries)
        kwargs = connection_kwargs(url, secret, timeout, connect_timeout, retry)
        tls = bool(kwargs.get("ssl"))
        kwargs["db"] = url.db
        if url.scheme == "redis+unix":
            kwargs["unix_socket_path"] = url.socket_path
        else:
            (host, port), *_ = url.hosts
            kwargs.update(host=host, port=port)
            kwargs["socket_keepalive"] = True
        endpoint = None
        if fast_path and url.scheme in ("redis", "redis+unix") and not client_kwargs and not tls:
            endpoint = Endpoint(
                host=kwargs.get("host", ""),
                port=kwargs.get("port", 0),
                unix_path=kwargs.get("unix_socket_path"),
                db=url.db,
                username=url.username,
                password=secret,
                timeout=timeout,
                connect_timeout=connect_timeout,
            )
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
        except KVCheckpointError:
            raise
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

    def value_sizes(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        with self._errors("reading sizes"):
            pipe = self._pipeline()
            for key in keys:
                pipe.strlen(key)
            return [int(n) for n in pipe.execute()]

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
            copy_replies(reads, todo, pipe.execute(), copied)
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
            if create:  # a commit: sent once, see _once
                return bool(self._once("SET", key, as_bytes_view(value), "NX", *_px(px)))
            return bool(self.client.set(key, as_bytes_view(value), px=px))

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        px = _ms(ttl) if ttl is not None else None
        with self._errors("writing"):
            previous: bytes | None = self._once("SET", key, as_bytes_view(value), "GET", *_px(px), get=True)
            return previous

    def _commit_client(self, key: str) -> Any:
        """The client a commit of ``key`` goes through (a Cluster sends it to the key's primary)."""
        return self.client

    def _once(self, *args: Any, **options: Any) -> Any:
        """Send a commit exactly once, bypassing the client's retry, and fence it if the reply is lost.

        redis-py re-sends any command whose reply was lost, which is unsafe for a conditional commit
        (a re-sent swap can reinstate a record whose data another writer already retired). After a
        lost reply the connection is killed server-side (CLIENT KILL ID), so the commit either has
        run or never will, and the caller learns which by reading the record (docs/reliability.md).
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

    # Server safety (called by the DCP adapter around a save) ----------------------------------

    def _servers(self) -> list[tuple[str, Any]]:
        """(name, client) for every server whose settings matter; a cluster lists each node."""
        return [(self.description, self.client)]

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse a server that may evict checkpoint keys; with ``allow_eviction`` only warn.

        Returns maxmemory-policy per server read. CONFIG may be denied (ACL, managed Redis, a renamed
        command): that server is then skipped with a debug log, since refusing would make kvckpt
        unusable there and the user cannot change the policy anyway.
        """
        policies: dict[str, str] = {}
        with self._errors("reading server settings"):
            for name, client in self._servers():
                try:
                    settings = {str_of(k): str_of(v) for k, v in client.config_get("maxmemory*").items()}
                except rex.ResponseError as exc:  # NOPERM, unknown command: CONFIG is off limits
                    logger.debug("%s: cannot read maxmemory-policy (%s)", name, type(exc).__name__)
                    continue
                policies[name] = settings.get("maxmemory-policy", "")
                problem = eviction_problem(name, settings)
                if problem and not allow_eviction:
                    raise UnsafeStoreConfigError(problem, server=name, policy=policies[name])
                if problem:
                    warnings.warn(problem, UnsafeStoreConfigWarning, stacklevel=2)
        return policies

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """Block until ``replicas`` replicas hold every write made so far (Redis WAIT).

        Returns how many acknowledged; raises ReplicationError when fewer did within ``timeout``
        seconds, because a failover now could lose acknowledged writes. ``fence_key`` (a key the
        caller may write, e.g. under its namespace) makes WAIT cover every connection's writes.
        """
        _check_wait_args(replicas, timeout)
        with self._errors("waiting for replicas"):
            acked = wait_on(self.client, replicas, timeout, fence_key)
        if acked < replicas:
            raise ReplicationError(
                replication_message(self.description, acked, replicas, timeout),
                acked=acked,
                wanted=replicas,
            )
        return acked


def str_of(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _check_wait_args(replicas: int, timeout: float) -> None:
    if replicas < 0 or not timeout > 0:
        raise ValueError(f"wait_for_replicas needs replicas >= 0 and timeout > 0, got {replicas}, {timeout}")


def replication_message(where: str, acked: int, wanted: int, timeout: float) -> str:
    return (
        f"{where}: only {acked} of {wanted} replica(s) acknowledged the writes within {timeout:g}s; a "
        "failover now could lose them. Check the replicas are up and linked (INFO replication) and "
        "that the replica output buffer limit is not cutting them off, or require fewer replicas"
    )
