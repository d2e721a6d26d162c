"""Every KVStore operation of every Redis store, written once over a ``Channel``: what carries the
commands to the server(s) that hold each key.

Three kinds of channel exist: kvckpt's RESP transport to one server (standalone.py), the same per
node of a Cluster with routing (cluster.py), and a redis-py-compatible client the caller injected
(client.py, client_cluster.py). The operations decide which commands to send and what their replies
mean; a channel decides only how they travel: batched and retried, sent once and fenced, values
read straight into the caller's buffers where it can.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from kvckpt._buffers import key_str
from kvckpt.store import Buffer, Capabilities, Commit, KVStore, RangeRead
from kvckpt.stores.redis.commands import (
    COMMIT,
    DELETE_IF,
    REDIS_MAX_VALUE,
    Command,
    Conditional,
    clock_of,
    commit_args,
    commit_outcome,
    copy_into,
    expiry_commands,
    expiry_results,
    getrange_command,
    glob_escape,
    px,
    set_command,
)
from kvckpt.stores.redis.failures import check_settings, translated
from kvckpt.stores.redis.replicas import WaitOne, check_wait_args, fewest_acks, wait_on
from kvckpt.stores.redis.slots import colocated_key
from kvckpt.stores.redis.transport import Arg, Reply

#: A server's name and how to read its ``CONFIG GET maxmemory*`` (for failures.check_settings).
Server = tuple[str, Callable[[], dict[str, str]]]


class Channel(abc.ABC):
    """How a store's commands reach the server(s) holding their keys, and come back.

    Every command it is given names one key (``args[1]``; EVAL: the first of its keys), so a Cluster
    channel can send each to the node serving it.
    """

    description: str
    #: Whether the store expects a Cluster (errors explain a server of the other kind).
    cluster: bool = False

    @property
    @abc.abstractmethod
    def timeout(self) -> float | None:
        """How long one reply may take, if known (errors say it; WAIT is cut into shorter slices)."""

    def errors(self, action: str) -> AbstractContextManager[None]:
        """A context that translates failures while doing ``action`` into kvckpt's errors."""
        return translated(self.description, action, self.timeout, cluster=self.cluster)

    @abc.abstractmethod
    def commands(self, commands: Sequence[Command], what: str) -> list[Reply]:
        """Replies to idempotent ``commands``, in order (sent again after a dropped link, as the
        channel's retry policy says); raises the first error reply."""

    @abc.abstractmethod
    def once(self, command: Command, key: str) -> Reply:
        """The reply to ``command`` on ``key``'s server, sent exactly once (kvckpt.stores.redis.fencing)."""

    def conditional(self, step: Conditional, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        """``step`` on the server of ``keys`` (one hash slot), as one atomic step; its script's reply."""
        return self.once(step.command(keys, args), keys[0])

    @abc.abstractmethod
    def time(self, key: str) -> Reply:
        """TIME's reply from the server that holds ``key``."""

    def write(self, items: Sequence[tuple[str, Buffer]], ttl: float | None) -> None:
        """SET each value (idempotent: sent again whole after a dropped link)."""
        self.commands([set_command(key, value, ttl) for key, value in items], "writing")

    def read_into(self, reads: Sequence[RangeRead]) -> list[int]:
        """Each read's byte range into its (non-empty) buffer; how many bytes each got."""
        replies = self.commands([getrange_command(r) for r in reads], "reading")
        return [
            copy_into(r.into, data) if isinstance(data, bytes) else 0
            for r, data in zip(reads, replies, strict=True)
        ]

    @abc.abstractmethod
    def scan(self, pattern: str) -> Iterator[Reply]:
        """Every key matching ``pattern`` on every primary; a key may come more than once."""

    @abc.abstractmethod
    def servers(self) -> list[Server]:
        """Every server whose settings decide whether keys survive."""

    @abc.abstractmethod
    def wait_each(self, wait: WaitOne, fence_key: str | None) -> dict[str | None, int]:
        """``wait`` on every primary that may hold this store's writes, by node name (None for the one
        server of a standalone store), each with a fence key it serves derived from ``fence_key``."""

    def waited(self) -> None:
        """Every primary ``wait_each`` named has acknowledged enough: forget what they were written."""
        return None  # only a Cluster channel keeps track of them

    @abc.abstractmethod
    def close(self) -> None:
        """Release the channel's connections (it reconnects if used again)."""


class RedisOperations(KVStore):
    """The KVStore operations of a Redis store, over its channel."""

    capabilities = Capabilities(
        max_value_bytes=REDIS_MAX_VALUE, native_ranges=True, ttl=True, conditional_commit=True
    )

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.description = channel.description

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return self.channel.errors(action)

    def close(self) -> None:
        self.channel.close()

    def colocated(self, key: str, anchor: str) -> str:
        """On a Cluster, ``key`` with a hash tag that puts it in ``anchor``'s slot, so the commit
        script may name both (a script's keys must share a slot)."""
        return colocated_key(key, anchor) if self.channel.cluster else key

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("reading"):
            replies = self.channel.commands([("GET", key) for key in keys], "reading")
        return [r if isinstance(r, bytes) else None for r in replies]

    def value_sizes(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        with self._errors("reading sizes"):
            replies = self.channel.commands([("STRLEN", key) for key in keys], "reading sizes")
        sizes: list[int] = []
        for n in replies:
            assert isinstance(n, int), n  # STRLEN always answers an integer; errors were raised
            sizes.append(n)
        return sizes

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        counts = [0] * len(reads)
        todo = [i for i, r in enumerate(reads) if len(r.into)]
        if todo:
            with self._errors("reading"):
                got = self.channel.read_into([reads[i] for i in todo])
            for i, n in zip(todo, got, strict=True):
                counts[i] = n
        return counts

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        if items:
            with self._errors("writing"):
                self.channel.write(items, ttl)

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        with self._errors("writing"):
            if create:  # a commit: sent once
                return self.channel.once(("SET", key, value, "NX", *px(ttl)), key) is not None
            self.channel.commands([set_command(key, value, ttl)], "writing")
            return True

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        with self._errors("writing"):
            previous = self.channel.once(("SET", key, value, "GET", *px(ttl)), key)
        return previous if isinstance(previous, bytes) else None

    def commit(
        self, key: str, value: Buffer, *, live_key: str, create: bool, ttl: float | None = None
    ) -> Commit:
        with self._errors("committing"):
            return commit_outcome(
                self.channel.conditional(COMMIT, (key, live_key), commit_args(value, create, ttl))
            )

    def delete_if(self, key: str, expected: Buffer) -> bool:
        with self._errors("deleting"):  # sent once: a re-send after a lost reply would answer 0
            return self.channel.conditional(DELETE_IF, (key,), (expected,)) == 1

    def clock(self, key: str) -> float:
        with self._errors("reading the server's clock"):
            return clock_of(self.channel.time(key))

    def take(self, key: str) -> bytes | None:
        with self._errors("deleting"):
            (value,) = self.channel.commands([("GETDEL", key)], "deleting")
        return value if isinstance(value, bytes) else None

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        if not keys:
            return []
        with self._errors("setting expiry"):
            replies = self.channel.commands(expiry_commands(keys, ttl), "setting expiry")
        return expiry_results(replies, ttl)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            with self._errors("deleting"):  # one UNLINK per key: a multi-key UNLINK cannot cross slots
                self.channel.commands([("UNLINK", key) for key in keys], "deleting")

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        seen: set[str] = set()  # SCAN may return a key twice (a rehash, a slot migrating, a retry)
        with self._errors("listing keys"):
            for raw in self.channel.scan(glob_escape(prefix) + "*"):
                key = key_str(raw if isinstance(raw, bytes) else str(raw))
                if key.startswith(prefix) and key not in seen:
                    seen.add(key)
                    yield key

    # Server safety (called by the DCP adapter around a save) ------------------------------------

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse a server that may evict checkpoint keys (failures.check_settings); returns each
        server's policy."""
        with self._errors("reading server settings"):
            return check_settings(self.channel.servers(), allow_eviction)

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """Block until ``replicas`` replicas hold every write made so far (Redis WAIT), on every primary
        that may hold this store's writes.

        Returns the fewest acknowledgements; raises ReplicationError when fewer did within ``timeout``
        seconds, because a failover now could lose acknowledged writes. ``fence_key`` (a key the
        caller may write, e.g. under its namespace) makes WAIT cover every connection's writes.
        """
        check_wait_args(replicas, timeout)

        def wait(run: Any, fence: str | None) -> int:
            return wait_on(run, replicas, timeout, fence, self.channel.timeout)

        with self._errors("waiting for replicas"):
            acks = self.channel.wait_each(wait, fence_key)
        fewest = fewest_acks(self.description, acks, replicas, timeout)
        self.channel.waited()
        return fewest
