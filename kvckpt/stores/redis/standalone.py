"""KVStore over one standalone Redis server (``redis://``, ``rediss://``, ``redis+unix://``).

Every operation goes through kvckpt's RESP transport (kvckpt.stores.redis.transport) and its one
retry policy; a client object the caller injects goes through kvckpt.stores.redis.client instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from kvckpt._buffers import key_str
from kvckpt.errors import ReplicationError
from kvckpt.store import Buffer, Capabilities, KVStore, RangeRead
from kvckpt.stores.redis import common
from kvckpt.stores.redis.common import (
    REDIS_MAX_VALUE,
    check_settings,
    check_wait_args,
    expiry_commands,
    expiry_results,
    glob_escape,
    password_of,
    px,
    replication_message,
    str_of,
    translated,
    wait_on,
)
from kvckpt.stores.redis.retry import RetryPolicy
from kvckpt.stores.redis.transport import Endpoint, Transport, raise_first
from kvckpt.stores.redis.url import parse_standalone_url
from kvckpt.urls import StoreURL, tls_of


class RedisStore(KVStore):
    """KVStore over one Redis server, on connections it opens itself."""

    capabilities = Capabilities(max_value_bytes=REDIS_MAX_VALUE, native_ranges=True, ttl=True)
    parse_url = staticmethod(parse_standalone_url)

    def __init__(self, endpoint: Endpoint, policy: RetryPolicy, description: str) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self.description = description
        self._transport = Transport(endpoint, policy, description)

    @classmethod
    def from_url(
        cls,
        url: StoreURL,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        total_timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.05,
        backoff_cap: float = 1.0,
        password: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> RedisStore:
        """``timeout`` bounds each reply; ``retries`` re-sends idempotent commands on a dropped link,
        waiting ``backoff`` seconds, doubling up to ``backoff_cap``; no retry starts that could not
        end within ``total_timeout`` (kvckpt.stores.redis.retry). Commits are never re-sent.
        The ``ssl_*`` keywords (redis-py's names) give TLS files the URL's ``?ca=&cert=&key=`` do not;
        any other redis-py option needs a redis-py client of your own (``client=``)."""
        tls = tls_of(url)
        given = {"ca": ssl_ca_certs, "cert": ssl_certfile, "key": ssl_keyfile}
        if tls is not None and any(given.values()):
            tls = replace(tls, **{k: v for k, v in given.items() if v and not getattr(tls, k)})
        host, port = url.hosts[0] if url.hosts else ("", 0)
        endpoint = Endpoint(
            host=host,
            port=port,
            unix_path=url.socket_path if url.scheme == "redis+unix" else None,
            db=url.db or 0,
            username=url.username,
            password=password_of(url, password),
            timeout=timeout,
            connect_timeout=connect_timeout,
            tls=tls is not None,
            ca=tls.ca if tls else None,
            cert=tls.cert if tls else None,
            key=tls.key if tls else None,
        )
        policy = RetryPolicy(retries, backoff, backoff_cap, timeout, connect_timeout, total_timeout)
        return cls(endpoint, policy, str(url.server))

    def close(self) -> None:
        self._transport.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "policy": self.policy, "description": self.description}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    def _errors(self, action: str) -> Any:
        return translated(self.description, action, self.policy.timeout)

    # KVStore --------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("reading"):
            replies = self._transport.execute([("GET", key) for key in keys], "reading")
        return [r if isinstance(r, bytes) else None for r in replies]

    def value_sizes(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        with self._errors("reading sizes"):
            replies = self._transport.execute([("STRLEN", key) for key in keys], "reading sizes")
        sizes: list[int] = []
        for n in replies:
            assert isinstance(n, int), n  # STRLEN always answers an integer; errors were raised
            sizes.append(n)
        return sizes

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

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        with self._errors("writing"):
            if create:  # a commit: sent once (Transport.once)
                return self._transport.once(("SET", key, value, "NX", *px(ttl))) is not None
            self._transport.execute([("SET", key, value, *px(ttl))], "writing")
            return True

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        with self._errors("writing"):
            previous = self._transport.once(("SET", key, value, "GET", *px(ttl)))
        return previous if isinstance(previous, bytes) else None

    def take(self, key: str) -> bytes | None:
        with self._errors("deleting"):
            (value,) = self._transport.execute([("GETDEL", key)], "deleting")
        return value if isinstance(value, bytes) else None

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        if not keys:
            return []
        with self._errors("setting expiry"):
            replies = self._transport.execute(expiry_commands(keys, ttl), "setting expiry")
        return expiry_results(replies, ttl)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            with self._errors("deleting"):
                self._transport.execute([("UNLINK", key) for key in keys], "deleting")

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        pattern = glob_escape(prefix) + "*"
        cursor: Any = b"0"
        with self._errors("listing keys"):
            while True:
                command = ("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                (reply,) = self._transport.execute([command], "listing keys")
                assert isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)
                cursor = reply[0]
                for raw in reply[1]:
                    key = key_str(raw if isinstance(raw, bytes) else str(raw))
                    if key.startswith(prefix):
                        yield key
                if cursor in (b"0", "0", 0):
                    return

    # Server safety (called by the DCP adapter around a save) ----------------------------------

    def _config_get(self) -> dict[str, str]:
        (reply,) = self._transport.run(lambda conn: conn.execute([("CONFIG", "GET", "maxmemory*")]))
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, list)
        return {str_of(k): str_of(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse a server that may evict checkpoint keys (common.check_settings); returns its policy."""
        with self._errors("reading server settings"):
            return check_settings([(self.description, self._config_get)], allow_eviction)

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
