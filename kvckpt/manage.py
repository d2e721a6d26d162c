"""Find, inspect, verify and remove committed checkpoints.

Torch-free, so the ``kvckpt`` command answers ``ls``/``info``/``verify``/``rm`` without importing torch.
A checkpoint under a prefix is any namespace equal to it or below it (``run1`` covers ``run1/step100``
but not ``run10``) whose record ``NAMESPACE/.metadata`` exists; records are found with SCAN, never KEYS.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvckpt import layout, record
from kvckpt.checksum import DEFAULT_BLOCK_BYTES, first_bad_block
from kvckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, KVCheckpointError
from kvckpt.layout import StoredChunk
from kvckpt.registry import parse_url
from kvckpt.store import KVStore, batched
from kvckpt.target import Resolver
from kvckpt.transfer import Transfer
from kvckpt.urls import StoreURL

log = logging.getLogger(__name__)

#: A generation directory (layout.new_save_id): what a damaged record's data keys live under.
_GENERATION = re.compile(r"g\d{8}T\d{6}-[0-9a-f]{8}")
_RANK_RECORD = re.compile(r"__\d+" + re.escape(layout.RECORD_NAME))
_RECORD_SUFFIX = "/" + layout.RECORD_NAME
#: Bytes fetched per verify request; with Transfer's in-flight bound this caps verify's memory.
_VERIFY_BATCH_BYTES = 16 << 20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Entry:
    """One state_dict value of a checkpoint, summed over its stored pieces (shards)."""

    fqn: str
    kind: str  # "tensor" or "bytes" (a non-tensor value DCP serialised)
    dtype: str | None
    shape: tuple[int, ...] | None  # the global shape
    chunks: int  # values in the store
    nbytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    """What the record of one committed checkpoint says about it.

    ``checkpoint_id`` has credentials redacted (safe to print); ``entries`` is filled by :func:`info`
    only, as listing reads nothing but the records.
    """

    checkpoint_id: str
    namespace: str
    created: float  # commit time, Unix seconds
    total_bytes: int
    num_tensors: int
    num_keys: int
    world_size: int
    expires_at: float | None
    save_id: str
    entries: tuple[Entry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.entries:
            del out["entries"]
        return out


@dataclass(frozen=True)
class VerifyResult:
    checkpoint_id: str
    num_keys: int
    nbytes: int
    #: False when the checkpoint was saved with checksums=False: only presence and sizes were checked.
    checksums: bool


class _Scope:
    """A prefix or checkpoint_id opened on its store, and how to name namespaces under it."""

    def __init__(self, checkpoint_id: object, client: Any, options: dict[str, Any]) -> None:
        self._resolver = Resolver(client, options)
        target = self._resolver.resolve(checkpoint_id)
        self.store: KVStore = target.store
        self.namespace = target.namespace
        self.display_id = target.display
        self._url: StoreURL | None = None
        if not self._resolver.injected:
            assert isinstance(checkpoint_id, str)
            self._url = parse_url(checkpoint_id)

    def display(self, namespace: str) -> str:
        return namespace if self._url is None else self._url.with_namespace(namespace).to_url(redact=True)

    def loadable(self, namespace: str) -> str:
        """The id with the caller's own credentials kept, so it can be passed straight to load()."""
        return namespace if self._url is None else self._url.with_namespace(namespace).to_url(redact=False)

    def __enter__(self) -> _Scope:
        return self

    def __exit__(self, *exc: object) -> None:
        self._resolver.close()


# Listing ---------------------------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, name: str, kind: type[int] | type[float] = int) -> Any:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise CorruptCheckpointError(f"{key}: the record's {name!r} is {value!r}, not a number", key=key)
    return kind(value)


def _info(scope: _Scope, namespace: str, body: dict[str, Any], key: str) -> CheckpointInfo:
    state_dict = body.get("state_dict")
    if not isinstance(state_dict, list):
        raise CorruptCheckpointError(f"{key}: the record has no state_dict list", key=key)
    expires = body.get("expires_at")
    return CheckpointInfo(
        checkpoint_id=scope.display(namespace),
        namespace=namespace,
        created=_number(body, key, "created", float),
        total_bytes=_number(body, key, "total_bytes"),
        num_tensors=sum(1 for row in state_dict if _is_tensor_entry(row)),
        num_keys=_number(body, key, "num_keys"),
        world_size=_number(body, key, "world_size"),
        expires_at=None if expires is None else _number(body, key, "expires_at", float),
        save_id=str(body.get("save_id", "")),
    )


def _is_tensor_entry(row: Any) -> bool:
    meta = row[1] if isinstance(row, list) and len(row) == 2 else None
    return isinstance(meta, dict) and meta.get("type") == "tensor"


def _infos(scope: _Scope) -> list[CheckpointInfo]:
    prefix = scope.namespace
    records = (key for key in scope.store.scan_prefix(prefix + "/") if key.endswith(_RECORD_SUFFIX))
    namespaces = [key[: -len(_RECORD_SUFFIX)] for key in records]
    found = []
    keys = [layout.record_key(ns) for ns in namespaces]
    for namespace, key, raw in zip(namespaces, keys, scope.store.get_many(keys), strict=True):
        if raw is None:  # deleted or expired since the scan
            continue
        try:
            found.append(_info(scope, namespace, record.decode_record(raw, key), key))
        except CorruptCheckpointError as exc:
            log.warning("skipping a damaged checkpoint: %s", exc)
    return sorted(found, key=lambda info: (info.created, info.namespace))


def list_checkpoints(prefix: str, *, client: Any = None, **store_options: Any) -> list[CheckpointInfo]:
    """Committed checkpoints at or below ``prefix`` (a URL whose namespace is the prefix), oldest first.

    Only namespaces with a record are listed, so a save still in progress or one that died never is.
    A record that cannot be decoded is skipped with a warning (``kvckpt verify`` says what is wrong).
    """
    with _Scope(prefix, client, store_options) as scope:
        return _infos(scope)


def latest(prefix: str, *, client: Any = None, **store_options: Any) -> str | None:
    """The checkpoint_id of the most recently committed checkpoint under ``prefix``, or None.

    Unlike the ids :func:`list_checkpoints` shows, this one keeps any password the prefix URL carried,
    so ``kvckpt.load(state, kvckpt.latest(prefix))`` works; treat it as you treat the prefix.
    """
    with _Scope(prefix, client, store_options) as scope:
        infos = _infos(scope)
        return scope.loadable(infos[-1].namespace) if infos else None


def _read_body(scope: _Scope) -> tuple[dict[str, Any], str]:
    key = layout.record_key(scope.namespace)
    raw = scope.store.get(key)
    if raw is None:
        raise CheckpointNotFoundError(
            f"{scope.display_id}: no committed checkpoint here (no record at {key!r}); list what exists "
            "with `kvckpt ls PREFIX` or kvckpt.list_checkpoints(prefix)",
            checkpoint_id=scope.display_id,
        )
    return record.decode_record(raw, key), key


def info(checkpoint_id: str, *, client: Any = None, **store_options: Any) -> CheckpointInfo:
    """One checkpoint's summary and its entries (fqn, dtype, global shape, chunks, bytes)."""
    with _Scope(checkpoint_id, client, store_options) as scope:
        body, key = _read_body(scope)
        summary = _info(scope, scope.namespace, body, key)
        entries: dict[str, Entry] = {}
        try:
            for fqn, meta in body["state_dict"]:
                shape = tuple(int(n) for n in meta["size"]) if meta["type"] == "tensor" else None
                entries[fqn] = Entry(str(fqn), str(meta["type"]), meta.get("dtype"), shape, 0, 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{key}: malformed state_dict in the record ({exc})", key=key
            ) from exc
        for item in record.decode_items(body, key):
            if item.fqn in entries:
                old = entries[item.fqn]
                entries[item.fqn] = dataclasses.replace(
                    old, chunks=old.chunks + len(item.chunks), nbytes=old.nbytes + item.nbytes
                )
        return dataclasses.replace(summary, entries=tuple(entries.values()))


def verify(
    checkpoint_id: str,
    *,
    progress: Progress | None = None,
    io_threads: int = 2,
    client: Any = None,
    **store_options: Any,
) -> VerifyResult:
    """Re-read every chunk of a checkpoint and check its size and block checksums.

    Raises CorruptCheckpointError naming the first problem, with every problem found in ``.problems``.
    ``progress`` is called (from I/O threads) with the bytes checked so far by each request.
    """
    with _Scope(checkpoint_id, client, store_options) as scope:
        bodies = [_read_body(scope)]
        for rank_key in _rank_records(scope.store, scope.namespace):
            raw = scope.store.get(rank_key)
            if raw is not None:
                bodies.append((record.decode_record(raw, rank_key), rank_key))
        problems: list[str] = []
        lock = threading.Lock()
        total_keys = total_bytes = 0
        checksums = True

        def check(batch: list[tuple[str, StoredChunk]], block: int) -> None:
            values = scope.store.get_many([layout.full_key(scope.namespace, c.key) for _, c in batch])
            found = []
            for (fqn, chunk), value in zip(batch, values, strict=True):
                where, sums = f"{fqn!r}, key {layout.full_key(scope.namespace, chunk.key)!r}", chunk.sums
                if value is None:
                    found.append(f"{where}: missing")
                elif len(value) != chunk.nbytes:
                    found.append(f"{where}: {len(value)} bytes, the record says {chunk.nbytes}")
                elif sums and (bad := first_bad_block(memoryview(value), block, sums)) is not None:
                    found.append(f"{where}: checksum mismatch in block {bad}")
            with lock:
                problems.extend(found)
            if progress is not None:
                progress(sum(c.nbytes for _, c in batch))

        max_ops = scope.store.capabilities.max_batch_ops
        with Transfer(io_threads) as transfer:
            for body, key in bodies:
                block = int(body.get("block_bytes") or DEFAULT_BLOCK_BYTES)
                checksums = checksums and body.get("checksum") is not None
                batch: list[tuple[str, StoredChunk]] = []
                size = 0
                for item in record.decode_items(body, key):
                    for chunk in item.chunks:
                        batch.append((item.fqn, chunk))
                        size += chunk.nbytes
                        total_keys += 1
                        total_bytes += chunk.nbytes
                        if size >= _VERIFY_BATCH_BYTES or len(batch) >= max_ops:
                            transfer.submit(check, batch, block)
                            batch, size = [], 0
                if batch:
                    transfer.submit(check, batch, block)
        if problems:
            raise CorruptCheckpointError(
                f"{scope.display_id}: {len(problems)} of {total_keys} chunks are damaged, e.g. "
                f"{problems[0]}; restore it from another copy or delete it",
                checkpoint_id=scope.display_id,
                problems=problems,
            )
        return VerifyResult(scope.display_id, total_keys, total_bytes, checksums)


# Deleting --------------------------------------------------------------------------------------


def _rank_records(store: KVStore, namespace: str) -> list[str]:
    """Rank-local records (use_collectives=False), not a nested checkpoint named ``__x``."""
    start = len(namespace) + 1
    return [k for k in store.scan_prefix(f"{namespace}/__") if _RANK_RECORD.fullmatch(k[start:])]


def _delete_keys(store: KVStore, keys: Iterator[str] | list[str]) -> int:
    count = 0
    for batch in batched(keys, 1000):  # bounds memory while scanning; the store splits for its server
        store.delete_many(batch)  # UNLINK on Redis: the server frees memory in the background
        count += len(batch)
    return count


def _generation_keys(store: KVStore, namespace: str) -> Iterator[str]:
    """Data keys of every generation in a namespace, for a record too damaged to list its own."""
    start = len(namespace) + 1
    for key in store.scan_prefix(f"{namespace}/g"):
        if _GENERATION.fullmatch(key[start:].split("/", 1)[0]):
            yield key


def _delete(store: KVStore, namespace: str) -> bool:
    found = False
    for key in [layout.record_key(namespace), *_rank_records(store, namespace)]:
        raw = store.take(key)  # first, and atomically: a save swapping in a new record meanwhile
        if raw is None:  # keeps it (and its data) whole rather than losing it to this delete
            continue
        found = True
        try:
            keys = [layout.full_key(namespace, k) for k in record.chunk_keys(record.decode_record(raw, key))]
        except CorruptCheckpointError as exc:
            log.warning("%s; removing every generation under %s instead", exc, namespace)
            _delete_keys(store, _generation_keys(store, namespace))
            continue
        _delete_keys(store, keys)
    return found


def delete(checkpoint_id: str, *, client: Any = None, **store_options: Any) -> bool:
    """Remove a checkpoint: the record first (it stops being visible at once), then its data.

    Returns False when there was no record. Rank-local records (use_collectives=False) go too. Keys
    go in batches of UNLINK, so deleting 100k keys does not stall the server.
    """
    with _Scope(checkpoint_id, client, store_options) as scope:
        return _delete(scope.store, scope.namespace)


def keep_last(
    prefix: str, n: int, *, dry_run: bool = False, client: Any = None, **store_options: Any
) -> list[CheckpointInfo]:
    """Delete all but the ``n`` most recently committed checkpoints under ``prefix``, oldest first.

    Returns the checkpoints deleted (or, with ``dry_run``, those that would be).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise KVCheckpointError(f"keep_last needs a count of checkpoints to keep (an int >= 0), got {n!r}")
    with _Scope(prefix, client, store_options) as scope:
        infos = _infos(scope)
        doomed = infos[: max(0, len(infos) - n)]
        if not dry_run:
            for old in doomed:
                _delete(scope.store, old.namespace)
        return doomed
