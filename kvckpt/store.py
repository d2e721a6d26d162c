"""The KVStore seam: the small, synchronous, bytes-only contract every backend implements.

Nothing here knows about torch or DCP. The DCP adapter batches its I/O through the `*_many`
methods so a backend can pipeline them (one round trip per batch, not per key).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

from kvckpt.errors import KVCheckpointError
from kvckpt.urls import StoreURL, parse_host_url

#: Anything exposing the buffer protocol as bytes: bytes, bytearray, memoryview.
Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (a runtime alias on 3.10)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can hold and do; the adapter sizes chunks and batches from it."""

    max_value_bytes: int
    native_ranges: bool
    ttl: bool
    #: How many keys a caller may usefully hand one ``*_many`` call. A hint for callers that want to
    #: report progress or bound memory: every backend splits larger batches itself.
    max_batch_ops: int = 1024
    #: Changing a key's expiry costs no rewrite of its value. When False (etcd re-puts the value as a
    #: new revision) the writer skips the pending-expiry protocol and writes final expiries directly.
    cheap_expiry: bool = True
    #: The backend implements :meth:`KVStore.commit`, :meth:`KVStore.delete_if` and
    #: :meth:`KVStore.clock` (docs/protocol.md).
    #: Without them a save commits unconditionally, and kvckpt.gc / keep_last refuse the store: an
    #: orphan can be told from a save that will still commit only when commits need a live marker.
    conditional_commit: bool = False


@dataclass(frozen=True)
class Commit:
    """What :meth:`KVStore.commit` did, decided atomically in the server."""

    #: The record was written (and the marker removed in the same step).
    written: bool
    #: The save's liveness marker existed. False means nothing changed and the save can never commit.
    alive: bool
    #: With ``create=False``: the value the record replaced (None if there was none).
    previous: bytes | None = None


@dataclass(frozen=True)
class RangeRead:
    """Read ``len(into)`` bytes of ``key`` starting at ``offset`` into the caller's buffer."""

    key: str
    offset: int
    into: memoryview


class KVStore(abc.ABC):
    """A flat byte key-value store. Keys are str (UTF-8 on the wire), values are bytes.

    Contract:
    - a missing key is a read *state* (None / a short read), never an exception;
    - ``put(..., create=True)`` is an atomic put-if-absent and reports whether it wrote;
    - ``swap`` atomically replaces a value and returns the previous one;
    - ``put(..., create=True)`` and ``swap`` are commits: sent once, never re-sent by the backend;
      when one raises StoreUnavailableError it has either taken effect or never will (the backend
      fences it), so the caller reads the key to learn which;
    - ``delete_many`` is idempotent;
    - ``ttl`` is seconds (float) until expiry, None for no expiry;
    - ``*_many`` take any number of keys: a backend splits a batch as its server needs;
    - stores connect lazily and pickle without their sockets.

    A backend is registered for a URL scheme (kvckpt.registry) and owns its URL grammar:
    ``parse_url`` turns a checkpoint_id into a StoreURL, ``from_url`` opens a store for it.
    """

    capabilities: Capabilities
    #: The port a host without one gets in ``parse_url``'s default grammar.
    default_port: int = 0

    @classmethod
    def parse_url(cls, text: str) -> StoreURL:
        """This backend's URL grammar; by default ``SCHEME://[user[:password]@]host[:port][,...]/NAMESPACE``."""
        return parse_host_url(text, cls.default_port, "write SCHEME://host[:port]/NAMESPACE")

    @abc.abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Whole values, None where a key is missing."""

    @abc.abstractmethod
    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        """Fill each ``into`` from its key; return the bytes copied per read.

        Fewer than ``len(into)`` means the key is missing or its value is shorter.
        """

    @abc.abstractmethod
    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        """Unconditional writes (overwrite)."""

    @abc.abstractmethod
    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        """One write; with ``create`` only if the key is absent. True when written."""

    @abc.abstractmethod
    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        """Atomically replace the value; return the previous one (None if there was none)."""

    def commit(
        self, key: str, value: Buffer, *, live_key: str, create: bool, ttl: float | None = None
    ) -> Commit:
        """The commit rule of docs/protocol.md, as one atomic step in the server.

        If ``live_key`` (the save's liveness marker) is absent, change nothing and return
        ``Commit(False, False)``: the save's marker lapsed and it must never commit. Else, with
        ``create``, if ``key`` exists change nothing and return ``Commit(False, True)``. Else write
        ``value`` at ``key`` (expiring after ``ttl``), remove ``live_key``, and return
        ``Commit(True, True, previous)`` with the replaced value when not ``create``.

        Because a commit that lands consumes the marker, it can land at most once: a commit whose
        reply was lost is fenced by deleting the marker, then reading ``key``. ``live_key`` comes from
        :meth:`colocated`, so both keys live on one server (one hash slot on a Redis Cluster).
        """
        raise KVCheckpointError(
            f"{type(self).__name__} has no conditional commit (capabilities.conditional_commit)"
        )

    def delete_if(self, key: str, expected: Buffer) -> bool:
        """Atomically remove ``key`` only while its value is ``expected``; True when removed. What
        keep_last deletes is the record it listed, never one an overwrite put there since."""
        raise KVCheckpointError(
            f"{type(self).__name__} has no conditional delete (capabilities.conditional_commit)"
        )

    def clock(self, key: str) -> float:
        """A reading of the store's own clock where ``key`` lives, for ordering commits: it grows
        from one commit to the next on the same store, whatever the saving hosts' clocks say
        (Redis: TIME in seconds; etcd: the cluster's revision). Only compared within one store."""
        raise KVCheckpointError(f"{type(self).__name__} has no clock (capabilities.conditional_commit)")

    def colocated(self, key: str, anchor: str) -> str:
        """A name starting with ``key`` that lives where ``anchor`` does, so one atomic server-side
        step can touch both (a Redis Cluster appends a hash tag; most stores return ``key``)."""
        return key

    @abc.abstractmethod
    def take(self, key: str) -> bytes | None:
        """Atomically read and remove a value (None if absent), so a delete cannot race a swap."""

    @abc.abstractmethod
    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        """Set (or with None remove) each key's expiry; False where the key does not exist."""

    @abc.abstractmethod
    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove keys; missing keys are not an error."""

    @abc.abstractmethod
    def scan_prefix(self, prefix: str) -> Iterator[str]:
        """Every key starting with ``prefix`` (literally: no glob), in no particular order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store reconnects if used again."""

    def check_total_bytes(self, nbytes: int) -> None:
        """Refuse, before any data moves, a checkpoint this backend is not meant to hold (etcd caps)."""
        return None

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse (or with ``allow_eviction`` warn about) a server that may drop checkpoint keys."""
        return {}

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """Block until ``replicas`` replicas hold every write so far; Redis only (WAIT).

        ``fence_key`` is a key the store may write briefly to pin down "every write so far"."""
        raise KVCheckpointError(
            f"{type(self).__name__} has no replicas to wait for: min_replicas is a Redis option "
            "(etcd already commits every write on a quorum)"
        )

    # Conveniences derived from the batched primitives.

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def exists(self, key: str) -> bool:
        return self.get_many([key])[0] is not None

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def value_sizes(self, keys: Sequence[str]) -> list[int]:
        """Each value's length in bytes (0 where a key is missing), to say how much keys hold.

        This default reads the values; backends that can ask for a length alone override it."""
        return [0 if value is None else len(value) for value in self.get_many(keys)]

    def delete_prefix(self, prefix: str, batch: int = 1000) -> int:
        """Delete every key under ``prefix`` in batches; returns how many were found."""
        found = 0
        for keys in batched(self.scan_prefix(prefix), batch):
            self.delete_many(keys)
            found += len(keys)
        return found

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
