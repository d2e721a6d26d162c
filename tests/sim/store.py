"""An in-memory KVStore whose every operation is a scheduling point of the simulation.

Each call first parks its thread at the gate (the scheduler) and runs only when the gate grants it,
so the order in which actors' operations reach the store is the scheduler's choice, fixed by the
seed. The gate may also have the reply lost (the operation ran, the caller gets
StoreUnavailableError) or a commit-like command delayed (it has not run yet, the caller gets
StoreUnavailableError, and it runs later at a step the scheduler picks): what a network does to a
client that cannot fence its commands.

Time is virtual: every operation that runs advances the store's clock by one second, keys expire
when their TTL has passed on that clock, and :meth:`SimStore.clock` reads it. SCAN is not a snapshot:
keys come in small batches with a scheduling point before each, keys present for the whole scan
always come, and keys created or removed meanwhile may or may not (as Redis SCAN promises).
"""

from __future__ import annotations

import dataclasses
import enum
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from kvckpt import store as kvstore
from kvckpt.errors import StoreUnavailableError
from kvckpt.store import Buffer, Capabilities, KVStore, RangeRead

T = TypeVar("T")

#: The path segment of a save's liveness marker (NAMESPACE/.live/SAVE_ID).
LIVE_SEGMENT = "/.live/"


class Decision(enum.Enum):
    """What happens to one operation the scheduler lets through."""

    RUN = "run"  # it runs and its reply arrives
    DROP = "drop"  # it runs, its reply is lost: the caller gets StoreUnavailableError
    LATE = "late"  # it runs later; the caller gets StoreUnavailableError now
    ABORT = "abort"  # the run is over: unwind without touching the store


@dataclass(frozen=True)
class Op:
    """One store operation as the scheduler sees it before it runs."""

    name: str
    detail: str
    #: A commit: put-if-absent, swap or the conditional commit. Only these are delivered late,
    #: as a real store's commit is the one command a client sends once and cannot re-send.
    commit_like: bool = False


class Gate(Protocol):
    """The scheduler, as the store sees it."""

    rng: random.Random

    def point(self, op: Op) -> Decision:
        """Park the calling thread until the scheduler lets ``op`` proceed."""

    def defer(self, op: Op, run: Callable[[], str]) -> None:
        """Keep ``run`` to be run at a later step (a command delivered late); it says what it did."""

    def outcome(self, text: str) -> None:
        """What the operation that just ran returned, for the trace."""

    def owner(self) -> str | None:
        """The actor the calling thread belongs to."""


@dataclass
class _Entry:
    value: bytes
    expires_at: float | None
    #: The actor that last gave the key an expiry, so a pause can expire that actor's markers.
    ttl_owner: str | None = None


def _short(key: str) -> str:
    return key.removeprefix("sim/") or key


def _keys(keys: Sequence[str]) -> str:
    shown = ", ".join(_short(k) for k in keys[:3])
    return f"[{shown}{', …' if len(keys) > 3 else ''}] ({len(keys)})" if len(keys) != 1 else _short(keys[0])


class _Scan:
    """One SCAN in progress: the order keys come in and what was decided about keys that were not
    there for the whole scan."""

    def __init__(self, store: SimStore, prefix: str, rng: random.Random) -> None:
        self.prefix = prefix
        self.order = sorted(k for k in store.data if k.startswith(prefix))
        rng.shuffle(self.order)
        self.decided: set[str] = set(self.order)

    def next_batch(self, store: SimStore, rng: random.Random) -> tuple[list[str], bool]:
        born_since = sorted(
            k for k, e in store.data.items() if k.startswith(self.prefix) and k not in self.decided
        )
        for key in born_since:  # created during the scan: it may come, or not
            self.decided.add(key)
            if rng.random() < 0.5:
                self.order.insert(rng.randint(0, len(self.order)), key)
        batch: list[str] = []
        size = rng.randint(1, 3)
        while self.order and len(batch) < size:
            key = self.order.pop(0)
            if key in store.data or rng.random() < 0.5:  # gone since it was listed: may still come
                batch.append(key)
        return batch, not self.order


class SimStore(KVStore):
    """Keys and values in a dict; every call goes through the gate (when one is set)."""

    def __init__(self) -> None:
        names = {f.name for f in dataclasses.fields(Capabilities)}
        extra = {"conditional_commit": True} if "conditional_commit" in names else {}
        self.capabilities = Capabilities(max_value_bytes=1 << 20, native_ranges=True, ttl=True, **extra)
        self.data: dict[str, _Entry] = {}
        self.ops = 0  # operations run so far: the store's clock, in virtual seconds
        self.gate: Gate | None = None
        #: Called with every (key, value) the store writes, to learn when records land.
        self.on_write: Callable[[str, bytes], None] | None = None
        #: Called with every (key, value) :meth:`take` removes, to learn whose record a deleter took.
        self.on_take: Callable[[str, bytes], None] | None = None
        self._lock = threading.RLock()

    # The scheduling point -------------------------------------------------------------------

    def _call(self, op: Op, run: Callable[[], T], show: Callable[[T], str] = lambda _: "ok") -> T:
        gate = self.gate
        decision = Decision.RUN if gate is None else gate.point(op)
        if decision is Decision.LATE:
            assert gate is not None
            gate.defer(op, lambda: show(self._run(run)))
            raise StoreUnavailableError(f"sim: {op.name} timed out (the command is delayed in the network)")
        result = self._run(run)
        if gate is not None:
            gate.outcome(show(result))
        if decision is Decision.DROP:
            raise StoreUnavailableError(f"sim: {op.name} ran but its reply was lost")
        return result

    def _run(self, run: Callable[[], T]) -> T:
        with self._lock:
            self.ops += 1
            self.expire()
            return run()

    @property
    def now(self) -> float:
        return float(self.ops)

    def expire(self) -> None:
        """Drop every key whose expiry has passed on the store's clock."""
        now = self.now
        for key in [k for k, e in self.data.items() if e.expires_at is not None and e.expires_at <= now]:
            del self.data[key]

    def _owner(self) -> str | None:
        return None if self.gate is None else self.gate.owner()

    def _write(self, key: str, value: Buffer, ttl: float | None) -> None:
        raw = bytes(value)
        self.data[key] = _Entry(
            raw, None if ttl is None else self.now + ttl, None if ttl is None else self._owner()
        )
        if self.on_write is not None:
            self.on_write(key, raw)

    # Views for the checkers: no scheduling point, no clock tick ------------------------------

    def peek(self, key: str) -> bytes | None:
        with self._lock:
            entry = self.data.get(key)
            return None if entry is None else entry.value

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self.data if k.startswith(prefix))

    def expire_markers_of(self, actor: str) -> list[str]:
        """What a pause past the liveness TTL does: the markers ``actor`` keeps alive expire."""
        with self._lock:
            gone = [
                k
                for k, e in self.data.items()
                if LIVE_SEGMENT in k and e.expires_at is not None and e.ttl_owner == actor
            ]
            for key in gone:
                del self.data[key]
            return sorted(gone)

    # The KVStore contract ---------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = list(keys)

        def run() -> list[bytes | None]:
            return [None if (e := self.data.get(k)) is None else e.value for k in keys]

        return self._call(
            Op("get", _keys(keys)), run, lambda got: "".join("-" if v is None else "+" for v in got)
        )

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        reads = list(reads)

        def run() -> list[int]:
            counts = []
            for read in reads:
                entry = self.data.get(read.key)
                piece = b"" if entry is None else entry.value[read.offset : read.offset + len(read.into)]
                read.into[: len(piece)] = piece
                counts.append(len(piece))
            return counts

        return self._call(Op("read", _keys([r.key for r in reads])), run, lambda n: f"{sum(n)} bytes")

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        items = [(key, bytes(value)) for key, value in items]

        def run() -> None:
            for key, value in items:
                self._write(key, value, ttl)

        self._call(Op("put_many", f"{_keys([k for k, _ in items])} ttl={ttl}"), run)

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        raw = bytes(value)

        def run() -> bool:
            if create and key in self.data:
                return False
            self._write(key, raw, ttl)
            return True

        op = Op("put_nx" if create else "put", f"{_short(key)} ttl={ttl}", commit_like=create)
        return self._call(op, run, str)

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        raw = bytes(value)

        def run() -> bytes | None:
            old = self.data.get(key)
            self._write(key, raw, ttl)
            return None if old is None else old.value

        op = Op("swap", f"{_short(key)} ttl={ttl}", commit_like=True)
        return self._call(op, run, lambda old: "replaced" if old is not None else "new")

    def commit(
        self, key: str, value: Buffer, *, live_key: str, create: bool, ttl: float | None = None
    ) -> Any:
        raw = bytes(value)

        def run() -> Any:
            if live_key not in self.data:
                return kvstore.Commit(False, False)
            old = self.data.get(key)
            if create and old is not None:
                return kvstore.Commit(False, True)
            self._write(key, raw, ttl)
            del self.data[live_key]
            return kvstore.Commit(True, True, None if create or old is None else old.value)

        def show(done: Any) -> str:
            return f"written={done.written} alive={done.alive}"

        op = Op("commit", f"{_short(key)} live={_short(live_key)} create={create}", commit_like=True)
        return self._call(op, run, show)

    def clock(self, key: str) -> float:
        return self._call(Op("clock", _short(key)), lambda: self.now, str)

    def colocated(self, key: str, anchor: str) -> str:
        return key

    def take(self, key: str) -> bytes | None:
        def run() -> bytes | None:
            entry = self.data.pop(key, None)
            if entry is not None and self.on_take is not None:
                self.on_take(key, entry.value)
            return None if entry is None else entry.value

        return self._call(Op("take", _short(key)), run, lambda v: "-" if v is None else "+")

    def delete_if(self, key: str, expected: Buffer) -> bool:
        raw = bytes(expected)

        def run() -> bool:
            entry = self.data.get(key)
            if entry is None or entry.value != raw:
                return False
            del self.data[key]
            if self.on_take is not None:
                self.on_take(key, entry.value)
            return True

        return self._call(Op("delete_if", _short(key)), run, str)

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        keys = list(keys)

        def run() -> list[bool]:
            found = []
            for key in keys:
                entry = self.data.get(key)
                found.append(entry is not None)
                if entry is not None:
                    entry.expires_at = None if ttl is None else self.now + ttl
                    entry.ttl_owner = None if ttl is None else self._owner()
            return found

        return self._call(
            Op("expire", f"{_keys(keys)} ttl={ttl}"), run, lambda f: "".join("+" if x else "-" for x in f)
        )

    def delete_many(self, keys: Sequence[str]) -> None:
        keys = list(keys)

        def run() -> None:
            for key in keys:
                self.data.pop(key, None)

        self._call(Op("delete", _keys(keys)), run)

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        scan: list[_Scan] = []

        def run() -> tuple[list[str], bool]:
            rng = random.Random(0) if self.gate is None else self.gate.rng
            if not scan:
                scan.append(_Scan(self, prefix, rng))
            return scan[0].next_batch(self, rng)

        while True:
            batch, done = self._call(Op("scan", repr(prefix)), run, lambda r: _keys(r[0]))
            yield from batch
            if done:
                return

    def close(self) -> None:
        return None
