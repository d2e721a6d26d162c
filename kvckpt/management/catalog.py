"""What the records under a namespace say: checkpoint summaries, entries and stored item rows.

Torch-free; kvckpt.management.api builds the public management API on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kvckpt import deadline, layout, record
from kvckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from kvckpt.management import orphans
from kvckpt.registry import parse_url
from kvckpt.store import KVStore, batched
from kvckpt.target import Resolver, checkpoint_text
from kvckpt.urls import StoreURL

log = logging.getLogger(__name__)

_ANY_RECORD = re.compile(r"/(__\d+)?" + re.escape(layout.RECORD_NAME) + "$")


@dataclass(frozen=True)
class Entry:
    """One state_dict value of a checkpoint, summed over its stored pieces (shards)."""

    fqn: str
    kind: str  # "tensor" or "bytes" (a non-tensor value DCP serialised)
    dtype: str | None
    shape: tuple[int, ...] | None  # the global shape
    chunks: int  # values in the store
    nbytes: int


class Ordered(Protocol):
    """What orders a checkpoint: a CheckpointInfo here, a DrainedCheckpoint on the durable tier."""

    @property
    def step(self) -> int | None: ...
    @property
    def commit_clock(self) -> float | None: ...
    @property
    def created(self) -> float: ...


C = TypeVar("C", bound=Ordered)


def by_step(checkpoints: Iterable[Ordered]) -> bool:
    """Whether steps order these checkpoints: only when every one of them recorded a step. One saved
    without ``step=`` has no place among steps, so a set holding one is ordered by commit alone, and
    the newest save is the last whatever steps the others recorded (keep_last never deletes it)."""
    return all(c.step is not None for c in checkpoints)


def order_key(checkpoint: Ordered, *, stepped: bool) -> tuple[int, bool, float]:
    """Where a checkpoint sorts, newest last, among a set for which :func:`by_step` said ``stepped``:
    by its step if so, then by the store's commit clock (docs/protocol.md: one clock orders commits).
    Records without that clock (written before kvckpt recorded it, or copied in from a folder or
    another store, whose clocks mean nothing here) come before those with one, by commit time."""
    clock = checkpoint.commit_clock
    return (
        (checkpoint.step or 0) if stepped else 0,
        clock is not None,
        checkpoint.created if clock is None else clock,
    )


def newest_last(checkpoints: Iterable[C], name: Callable[[C], str]) -> list[C]:
    """``checkpoints`` oldest first, in the one order latest(), keep_last, ``kvckpt ls``, the drainer
    and newest_restorable share; ``name`` breaks ties, so the order never depends on a listing's."""
    found = list(checkpoints)
    stepped = by_step(found)
    return sorted(found, key=lambda c: (*order_key(c, stepped=stepped), name(c)))


@dataclass(frozen=True)
class CheckpointInfo:
    """What the record of one committed checkpoint says about it.

    ``checkpoint_id`` keeps the credentials of the URL you listed with, so it can be passed straight
    back to ``load``/``verify``/``delete``: treat it as you treat that URL. ``display_id`` has them
    redacted (what to print or log; ``repr`` and :meth:`to_dict` show only it). ``entries`` is filled by
    :func:`info` only, as listing reads nothing but the records. A checkpoint saved with
    ``use_collectives=False`` has one record per rank (``rank_local``); its numbers are their sums.
    """

    checkpoint_id: str = field(repr=False)
    namespace: str
    created: float  # commit time, Unix seconds (a copy keeps its source's)
    total_bytes: int
    num_tensors: int
    num_keys: int
    world_size: int
    expires_at: float | None
    save_id: str
    entries: tuple[Entry, ...] = ()
    display_id: str = ""
    step: int | None = None
    rank_local: bool = False
    #: The store's clock at the commit (kvckpt.store.KVStore.clock): orders commits on one store
    #: whatever the saving hosts' clocks say. None for records written before kvckpt recorded it.
    commit_clock: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Printable: ``checkpoint_id`` is the redacted display form."""
        out = dataclasses.asdict(self)
        out["checkpoint_id"] = out.pop("display_id")
        if not self.entries:
            del out["entries"]
        return out


class Scope:
    """A prefix or checkpoint_id opened on its store, and how to name namespaces under it. While it
    is open every store operation shares one deadline (kvckpt.deadline): a listing, a gc or a
    keep_last fails within the store's total_timeout when the store stops answering."""

    def __init__(self, checkpoint_id: object, client: Any, options: dict[str, Any]) -> None:
        checkpoint_id = checkpoint_text(checkpoint_id)
        self._resolver = Resolver(client, options)
        target = self._resolver.resolve(checkpoint_id)
        self.store: KVStore = target.store
        self.namespace = target.namespace
        self.display_id = target.display
        self._url: StoreURL | None = None
        self._deadline = contextlib.ExitStack()
        if not self._resolver.injected:
            assert isinstance(checkpoint_id, str)
            self._url = parse_url(checkpoint_id)

    def display(self, namespace: str) -> str:
        return namespace if self._url is None else self._url.with_namespace(namespace).to_url(redact=True)

    def loadable(self, namespace: str) -> str:
        """The id with the caller's own credentials kept, so it can be passed straight to load()."""
        return namespace if self._url is None else self._url.with_namespace(namespace).to_url(redact=False)

    def __enter__(self) -> Scope:
        self._deadline.enter_context(deadline.scope())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._resolver.close()
        finally:
            self._deadline.close()


def _number(body: dict[str, Any], key: str, name: str, kind: type[int] | type[float] = int) -> Any:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise CorruptCheckpointError(f"{key}: the record's {name!r} is {value!r}, not a number", key=key)
    return kind(value)


def _info(scope: Scope, namespace: str, body: dict[str, Any], key: str) -> CheckpointInfo:
    state_dict = body.get("state_dict")
    if not isinstance(state_dict, list):
        raise CorruptCheckpointError(f"{key}: the record has no state_dict list", key=key)
    expires = body.get("expires_at")
    step = body.get("step")
    clock = body.get("commit_clock")
    return CheckpointInfo(
        checkpoint_id=scope.loadable(namespace),
        display_id=scope.display(namespace),
        namespace=namespace,
        created=_number(body, key, "created", float),
        total_bytes=_number(body, key, "total_bytes"),
        num_tensors=sum(1 for row in state_dict if _is_tensor_entry(row)),
        num_keys=_number(body, key, "num_keys"),
        world_size=_number(body, key, "world_size"),
        expires_at=None if expires is None else _number(body, key, "expires_at", float),
        save_id=str(body.get("save_id", "")),
        step=None if step is None else _number(body, key, "step"),
        commit_clock=None if clock is None else _number(body, key, "commit_clock", float),
    )


def summarize(scope: Scope, namespace: str, bodies: list[tuple[dict[str, Any], str]]) -> CheckpointInfo:
    """One summary of a checkpoint: its global record, or the sum of its rank-local records."""
    infos = [_info(scope, namespace, body, key) for body, key in bodies]
    first = infos[0]
    if bodies[0][1] == layout.record_key(namespace):
        return first
    expiries = [i.expires_at for i in infos if i.expires_at is not None]
    return dataclasses.replace(
        first,
        created=max(i.created for i in infos),
        commit_clock=max((i.commit_clock for i in infos if i.commit_clock is not None), default=None),
        total_bytes=sum(i.total_bytes for i in infos),
        num_keys=sum(i.num_keys for i in infos),
        world_size=len(infos),
        expires_at=min(expiries) if expiries else None,
        rank_local=True,
    )


def _is_tensor_entry(row: Any) -> bool:
    meta = row[1] if isinstance(row, list) and len(row) == 2 else None
    return isinstance(meta, dict) and meta.get("type") == "tensor"


def _decoded(store: KVStore, keys: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, body) of each record still there; damaged ones are skipped with a warning."""
    for part in batched(keys, store.capabilities.max_batch_ops):
        for key, raw in zip(part, store.get_many(part), strict=True):
            if raw is None:  # deleted or expired since the scan
                continue
            try:
                yield key, record.decode_record(raw, key)
            except CorruptCheckpointError as exc:
                log.warning("skipping a damaged checkpoint: %s", exc)


def summaries(scope: Scope) -> list[CheckpointInfo]:
    """Every checkpoint at or below the scope's namespace, oldest first (:func:`newest_last`)."""
    by_namespace: dict[str, list[str]] = {}
    for key in scope.store.scan_prefix(scope.namespace + "/"):
        if (found := _ANY_RECORD.search(key)) is not None:
            by_namespace.setdefault(key[: found.start()], []).append(key)
    found_infos = []
    for namespace, keys in by_namespace.items():
        main = layout.record_key(namespace)
        if main in keys:  # a global record is the checkpoint; rank records beside it are its own
            keys = [main]
        bodies = [(body, key) for key, body in _decoded(scope.store, sorted(keys))]
        if bodies:
            try:
                found_infos.append(summarize(scope, namespace, bodies))
            except CorruptCheckpointError as exc:
                log.warning("skipping a damaged checkpoint: %s", exc)
    return newest_last(found_infos, lambda info: info.namespace)


def bodies(scope: Scope, namespace: str, display: str) -> list[tuple[dict[str, Any], str]]:
    """The checkpoint's records: the global one, else every rank-local one (use_collectives=False)."""
    key = layout.record_key(namespace)
    raw = scope.store.get(key)
    if raw is not None:
        return [(record.decode_record(raw, key), key)]
    found = []
    for rank_key in sorted(orphans.rank_records(scope.store, namespace)):
        raw = scope.store.get(rank_key)
        if raw is not None:
            found.append((record.decode_record(raw, rank_key), rank_key))
    if found:
        return found
    left = orphans.survey(scope.store, namespace, only_namespace=True)
    hint = ""
    if left.orphans:
        hint = f"; {orphans.summary(left.orphans)} here: `kvckpt gc` or kvckpt.gc() removes them"
    raise CheckpointNotFoundError(
        f"{display}: no committed checkpoint here (no record at {key!r}){hint}; list what exists "
        "with `kvckpt ls PREFIX` or kvckpt.list_checkpoints(prefix)",
        checkpoint_id=display,
    )
