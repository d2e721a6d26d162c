"""What the standalone and Cluster stores share over kvckpt's RESP transport: their options, and every
KVStore operation that is a batch of small single-key commands.

The two differ only in where a command goes (one server, or the node serving the key's slot), so each
supplies ``_commands`` (idempotent, retried by the policy) and ``_once`` (a commit, sent once).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvckpt._buffers import key_str
from kvckpt.errors import InvalidStoreOptionError
from kvckpt.store import Buffer, Capabilities, Commit, KVStore
from kvckpt.stores.redis.common import (
    REDIS_MAX_VALUE,
    expiry_commands,
    expiry_results,
    ms,
    password_of,
    px,
    str_of,
)
from kvckpt.stores.redis.retry import RetryPolicy
from kvckpt.stores.redis.transport import Arg, Endpoint, Reply, Transport
from kvckpt.urls import StoreURL, tls_of

Command = tuple[Arg, ...]  # ("SET", key, value, ...): the key is args[1], except for EVAL

#: The commit rule (docs/protocol.md) as one server-side step. KEYS: the record, the save's liveness
#: marker (one hash slot). ARGV: the record, "1" for put-if-absent, the expiry in ms or "". Replies
#: {0}: the marker is gone (nothing changed); {1}: the record exists (create; nothing changed);
#: {2} or {2, previous}: written, and the marker removed. UNLINK, not DEL: one ACL rule fewer.
COMMIT_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
local previous = false
if ARGV[2] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return {1} end
else
  previous = redis.call('GET', KEYS[1])
end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
end
redis.call('UNLINK', KEYS[2])
if previous then return {2, previous} end
return {2}
"""


#: Compare-and-delete: KEYS[1] is removed only while it holds ARGV[1]; replies 1 when it was.
DELETE_IF_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('UNLINK', KEYS[1]) end
return 0
"""


def commit_command(key: str, value: Buffer, live_key: str, create: bool, ttl: float | None) -> Command:
    """The EVAL that runs COMMIT_SCRIPT (sent whole: no SCRIPT LOAD permission or NOSCRIPT retry)."""
    expiry = "" if ttl is None else str(ms(ttl))
    return ("EVAL", COMMIT_SCRIPT, 2, key, live_key, value, "1" if create else "0", expiry)


def commit_outcome(reply: Any) -> Commit:
    """COMMIT_SCRIPT's reply as a Commit."""
    if not isinstance(reply, list) or not reply or reply[0] not in (0, 1, 2):
        raise ValueError(f"the commit script answered {reply!r:.80}")
    previous = reply[1] if len(reply) > 1 and isinstance(reply[1], bytes) else None
    return Commit(written=reply[0] == 2, alive=reply[0] != 0, previous=previous)


def clock_of(reply: Any) -> float:
    """TIME's reply (seconds, microseconds) as seconds."""
    assert isinstance(reply, list) and len(reply) == 2, reply
    return int(reply[0]) + int(reply[1]) / 1e6


@dataclass(frozen=True)
class Options:
    """The store options every Redis URL takes (``open_store(url, **options)``, ``store_options=``).

    ``timeout`` bounds each reply; ``retries`` re-sends idempotent commands on a dropped link, waiting
    ``backoff`` seconds, doubling up to ``backoff_cap``; no retry starts that could not end within
    ``total_timeout`` (kvckpt.stores.redis.retry). Commits are never re-sent. The ``ssl_*`` keywords
    (redis-py's names) give TLS files the URL's ``?ca=&cert=&key=`` do not.
    """

    timeout: float = RetryPolicy.timeout
    connect_timeout: float = RetryPolicy.connect_timeout
    total_timeout: float = RetryPolicy.total_timeout
    retries: int = RetryPolicy.retries
    backoff: float = RetryPolicy.backoff
    backoff_cap: float = RetryPolicy.backoff_cap
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        """Refuse a wrong type now, named; ``policy()``, which every ``from_url`` builds at once,
        checks the numbers."""
        for name in ("password", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if not isinstance(getattr(self, name), str | None):
                raise InvalidStoreOptionError(f"store option {name}: expected a string", options=[name])

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            self.retries,
            self.backoff,
            self.backoff_cap,
            self.timeout,
            self.connect_timeout,
            self.total_timeout,
        )

    def endpoint(self, url: StoreURL, **where: Any) -> Endpoint:
        """Connection settings from ``url`` and these options; ``where`` sets host, port, socket or DB."""
        tls = tls_of(url)
        given = {"ca": self.ssl_ca_certs, "cert": self.ssl_certfile, "key": self.ssl_keyfile}
        if tls is not None and any(given.values()):
            tls = replace(tls, **{k: v for k, v in given.items() if v and not getattr(tls, k)})
        return Endpoint(
            username=url.username,
            password=password_of(url, self.password),
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            tls=tls is not None,
            ca=tls.ca if tls else None,
            cert=tls.cert if tls else None,
            key=tls.key if tls else None,
            **where,
        )


def scan_keys(execute: Callable[[list[Command]], list[Reply]], prefix: str, pattern: str) -> Iterator[str]:
    """Every key under ``prefix`` on one server, by SCAN with MATCH ``pattern``."""
    cursor: Reply = b"0"
    while True:
        (reply,) = execute([("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)])  # type: ignore[list-item]
        assert isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)
        cursor = reply[0]
        for raw in reply[1]:
            key = key_str(raw if isinstance(raw, bytes) else str(raw))
            if key.startswith(prefix):
                yield key
        if cursor in (b"0", "0", 0):
            return


def read_settings(transport: Transport) -> dict[str, str]:
    """``CONFIG GET maxmemory*`` on one server, as a dict (for common.check_settings); an error reply
    (NOPERM, a renamed CONFIG) is raised."""
    (reply,) = transport.execute([("CONFIG", "GET", "maxmemory*")], "reading server settings")
    assert isinstance(reply, list)
    return {str_of(k): str_of(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}


class RespStore(KVStore):
    """The KVStore operations made of small single-key commands, for stores on the RESP transport."""

    capabilities = Capabilities(
        max_value_bytes=REDIS_MAX_VALUE, native_ranges=True, ttl=True, conditional_commit=True
    )
    #: The options ``from_url`` takes (kvckpt.target checks them before anything connects).
    store_options = Options
    description: str
    policy: RetryPolicy

    @abc.abstractmethod
    def _errors(self, action: str) -> Any:
        """A context that translates failures while doing ``action`` into kvckpt's errors."""

    @abc.abstractmethod
    def _commands(self, commands: Sequence[Command], what: str) -> list[Reply]:
        """Replies to idempotent ``commands`` (retried by the policy); raises the first error reply."""

    @abc.abstractmethod
    def _once(self, command: Command, key: str) -> Reply:
        """The reply to a commit of ``key``, sent exactly once (fenced when its reply is lost)."""

    @abc.abstractmethod
    def _time(self, key: str) -> Reply:
        """TIME's reply from the server that holds ``key``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("reading"):
            replies = self._commands([("GET", key) for key in keys], "reading")
        return [r if isinstance(r, bytes) else None for r in replies]

    def value_sizes(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        with self._errors("reading sizes"):
            replies = self._commands([("STRLEN", key) for key in keys], "reading sizes")
        sizes: list[int] = []
        for n in replies:
            assert isinstance(n, int), n  # STRLEN always answers an integer; errors were raised
            sizes.append(n)
        return sizes

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        with self._errors("writing"):
            if create:
                return self._once(("SET", key, value, "NX", *px(ttl)), key) is not None
            self._commands([("SET", key, value, *px(ttl))], "writing")
            return True

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        with self._errors("writing"):
            previous = self._once(("SET", key, value, "GET", *px(ttl)), key)
        return previous if isinstance(previous, bytes) else None

    def commit(
        self, key: str, value: Buffer, *, live_key: str, create: bool, ttl: float | None = None
    ) -> Commit:
        with self._errors("committing"):
            return commit_outcome(self._once(commit_command(key, value, live_key, create, ttl), key))

    def delete_if(self, key: str, expected: Buffer) -> bool:
        with self._errors("deleting"):  # sent once: a re-send after a lost reply would answer 0
            return self._once(("EVAL", DELETE_IF_SCRIPT, 1, key, expected), key) == 1

    def clock(self, key: str) -> float:
        with self._errors("reading the server's clock"):
            return clock_of(self._time(key))

    def take(self, key: str) -> bytes | None:
        with self._errors("deleting"):
            (value,) = self._commands([("GETDEL", key)], "deleting")
        return value if isinstance(value, bytes) else None

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        if not keys:
            return []
        with self._errors("setting expiry"):
            replies = self._commands(expiry_commands(keys, ttl), "setting expiry")
        return expiry_results(replies, ttl)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            with self._errors("deleting"):  # one UNLINK per key: a multi-key UNLINK cannot cross slots
                self._commands([("UNLINK", key) for key in keys], "deleting")
