"""Find, inspect, verify and remove committed checkpoints.

Torch-free, so the ``kvckpt`` command answers ``ls``/``info``/``verify``/``rm`` without importing torch.
A checkpoint under a prefix is any namespace equal to it or below it (``run1`` covers ``run1/step100``
but not ``run10``) whose record ``NAMESPACE/.metadata`` (or rank records ``NAMESPACE/__R.metadata``)
exists; records are found with SCAN, never KEYS.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvckpt import layout, record
from kvckpt.checksum import DEFAULT_BLOCK_BYTES, first_bad_block
from kvckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, KVCheckpointError
from kvckpt.layout import StoredChunk
from kvckpt.management import catalog, orphans
from kvckpt.management.catalog import CheckpointInfo as CheckpointInfo  # re-exported: kvckpt.CheckpointInfo
from kvckpt.management.catalog import Entry as Entry
from kvckpt.store import KVStore, batched
from kvckpt.transfer import Transfer

log = logging.getLogger(__name__)

#: Bytes fetched per verify request; with Transfer's in-flight bound this caps verify's memory.
_VERIFY_BATCH_BYTES = 16 << 20

Progress = Callable[[int], None]
#: A checkpoint id or prefix: a URL (with ``client=``, a bare namespace), as text or os.PathLike.
Id = str | os.PathLike[str]


@dataclass(frozen=True)
class VerifyResult:
    checkpoint_id: str
    num_keys: int
    nbytes: int
    #: False when the checkpoint was saved with checksums=False: only presence and sizes were checked.
    checksums: bool


# Listing ---------------------------------------------------------------------------------------


def list_checkpoints(prefix: Id, *, client: Any = None, **store_options: Any) -> list[CheckpointInfo]:
    """Committed checkpoints at or below ``prefix`` (a URL whose namespace is the prefix), oldest first.

    Only namespaces with a record are listed, so a save still in progress or one that died never is
    (:func:`list_orphans` finds what a dead one left). Checkpoints saved with ``use_collectives=False``
    are listed once, with their rank records summed. A record that cannot be decoded is skipped with a
    warning (``kvckpt verify`` says what is wrong). Oldest first means by ``step`` when every one
    recorded a step (``kvckpt.save(..., step=N)``), else by the store's clock at each commit.
    """
    with catalog.Scope(prefix, client, store_options) as scope:
        return catalog.summaries(scope)


def latest(prefix: Id, *, verify: bool = False, client: Any = None, **store_options: Any) -> str | None:
    """The checkpoint_id of the newest committed checkpoint under ``prefix``, or None.

    The id keeps any password the prefix URL carried, so ``kvckpt.load(state, kvckpt.latest(prefix))``
    works; treat it as you treat the prefix. With ``verify=True`` it is the newest one whose every
    chunk verifies (see :func:`verify`): a restart never picks a damaged checkpoint; those skipped
    are logged as warnings.
    """
    with catalog.Scope(prefix, client, store_options) as scope:
        infos = catalog.summaries(scope)
        for candidate in reversed(infos):
            if not verify:
                return candidate.checkpoint_id
            try:
                _verify(scope, candidate.namespace, candidate.display_id, None, 2)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                log.warning("latest: skipping %s: %s", candidate.display_id, exc)
                continue
            return candidate.checkpoint_id
        return None


def info(checkpoint_id: Id, *, client: Any = None, **store_options: Any) -> CheckpointInfo:
    """One checkpoint's summary and its entries (fqn, dtype, global shape, chunks, bytes)."""
    with catalog.Scope(checkpoint_id, client, store_options) as scope:
        bodies = catalog.bodies(scope, scope.namespace, scope.display_id)
        summary = catalog.summarize(scope, scope.namespace, bodies)
        entries: dict[str, Entry] = {}
        for body, key in bodies:
            try:
                for fqn, meta in body["state_dict"]:
                    shape = tuple(int(n) for n in meta["size"]) if meta["type"] == "tensor" else None
                    entries.setdefault(
                        fqn, Entry(str(fqn), str(meta["type"]), meta.get("dtype"), shape, 0, 0)
                    )
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


def list_orphans(prefix: Id, *, client: Any = None, **store_options: Any) -> list[orphans.Orphan]:
    """Generations at or below ``prefix`` that no record names and no live save is writing: what
    saves that died left behind (docs/record-format.md). Each says its keys and bytes."""
    with catalog.Scope(prefix, client, store_options) as scope:
        return list(orphans.survey(scope.store, scope.namespace).orphans)


def gc(
    prefix: Id, *, dry_run: bool = False, client: Any = None, **store_options: Any
) -> list[orphans.Orphan]:
    """Delete the orphaned generations at or below ``prefix``; returns them (with ``dry_run``, only
    finds them). Never touches a generation a record names, nor a save in progress (one whose
    ``.live`` marker still exists)."""
    with catalog.Scope(prefix, client, store_options) as scope:
        orphans.require_conditional_commit(scope.store)
        found = orphans.survey(scope.store, scope.namespace)
        return list(found.orphans) if dry_run else orphans.remove(scope.store, found.orphans, found.markers)


# Verifying -------------------------------------------------------------------------------------


def verify(
    checkpoint_id: Id,
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
    with catalog.Scope(checkpoint_id, client, store_options) as scope:
        return _verify(scope, scope.namespace, scope.display_id, progress, io_threads)


def _verify(
    scope: catalog.Scope, namespace: str, display: str, progress: Progress | None, io_threads: int
) -> VerifyResult:
    bodies = catalog.bodies(scope, namespace, display)
    if bodies[0][1] == layout.record_key(namespace):
        for rank_key in orphans.rank_records(scope.store, namespace):
            raw = scope.store.get(rank_key)
            if raw is not None:
                bodies.append((record.decode_record(raw, rank_key), rank_key))
    problems: list[str] = []
    lock = threading.Lock()
    total_keys = total_chunks = total_bytes = 0
    checksums = True

    def check(batch: list[tuple[int, list[tuple[str, StoredChunk]]]], block: int) -> None:
        """Each value of ``batch`` (its size by the record, the chunks in it) is that long, and each
        chunk's own blocks match their checksums: a pack's items are checked one by one."""
        values = scope.store.get_many([layout.full_key(namespace, chunks[0][1].key) for _, chunks in batch])
        found = []
        for (size, chunks), value in zip(batch, values, strict=True):
            for fqn, chunk in chunks:
                where, sums = f"{fqn!r}, key {layout.full_key(namespace, chunk.key)!r}", chunk.sums
                data = memoryview(value or b"")[chunk.offset : chunk.end]
                if value is None:
                    found.append(f"{where}: missing")
                elif len(value) != size:
                    found.append(f"{where}: {len(value)} bytes, the record says {size}")
                elif sums and (bad := first_bad_block(data, block, sums)) is not None:
                    found.append(f"{where}: checksum mismatch in block {bad}")
        with lock:
            problems.extend(found)
        if progress is not None:
            progress(sum(c.nbytes for _, chunks in batch for _, c in chunks))

    max_ops = scope.store.capabilities.max_batch_ops
    with Transfer(io_threads) as transfer:
        for body, key in bodies:
            block = int(body.get("block_bytes") or DEFAULT_BLOCK_BYTES)
            checksums = checksums and body.get("checksum") is not None
            by_key: dict[str, list[tuple[str, StoredChunk]]] = {}
            for item in record.decode_items(body, key):
                for chunk in item.chunks:
                    by_key.setdefault(chunk.key, []).append((item.fqn, chunk))
                    total_chunks += 1
                    total_bytes += chunk.nbytes
            total_keys += len(by_key)
            batch: list[tuple[int, list[tuple[str, StoredChunk]]]] = []
            size = 0
            for chunks in by_key.values():
                value_size = max(c.end for _, c in chunks)
                batch.append((value_size, chunks))
                size += value_size
                if size >= _VERIFY_BATCH_BYTES or len(batch) >= max_ops:
                    transfer.submit(check, batch, block)
                    batch, size = [], 0
            if batch:
                transfer.submit(check, batch, block)
    if problems:
        raise CorruptCheckpointError(
            f"{display}: {len(problems)} of {total_chunks} chunks are damaged, e.g. "
            f"{problems[0]}; restore it from another copy or delete it",
            checkpoint_id=display,
            problems=problems,
        )
    return VerifyResult(display, total_keys, total_bytes, checksums)


# Deleting --------------------------------------------------------------------------------------


def _delete_keys(store: KVStore, keys: Iterator[str] | list[str]) -> int:
    count = 0
    for batch in batched(keys, 1000):  # bounds memory while scanning; the store splits for its server
        store.delete_many(batch)  # UNLINK on Redis: the server frees memory in the background
        count += len(batch)
    return count


def _reclaim(store: KVStore, prefix: str, *, only_namespace: bool = False) -> list[orphans.Orphan]:
    """Remove the orphaned generations at or below ``prefix`` where the store can tell them apart
    from a save about to commit (kvckpt.management.orphans.remove); elsewhere leave them, with a warning."""
    if not store.capabilities.conditional_commit:
        log.warning("%s: orphaned generations are left (no conditional commit in this store)", prefix)
        return []
    found = orphans.survey(store, prefix, only_namespace=only_namespace)
    return orphans.remove(store, found.orphans, found.markers)


def _taken(store: KVStore, key: str, listed: CheckpointInfo | None) -> bytes | None:
    """Remove the record at ``key`` and return it, atomically: a save swapping in a new record
    meanwhile keeps it (and its data) whole rather than losing it to this delete. With ``listed``,
    only the record as it was listed goes (docs/protocol.md: keep_last deletes what it chose), never
    one an overwrite committed since, which the store's clock tells apart."""
    if listed is None or not store.capabilities.conditional_commit:
        return store.take(key)
    raw = store.get(key)
    if raw is None:
        return None
    try:
        body = record.decode_record(raw, key)
    except CorruptCheckpointError:
        body = {}
    clock, ours = body.get("commit_clock"), body.get("save_id") == listed.save_id
    if isinstance(clock, int | float) and listed.commit_clock is not None:
        ours = clock <= listed.commit_clock
    if not ours or not store.delete_if(key, raw):
        log.info("%s changed since it was listed; keeping the new record", key)
        return None
    return raw


def _delete(store: KVStore, namespace: str, listed: CheckpointInfo | None = None) -> bool:
    found = False
    for key in [layout.record_key(namespace), *orphans.rank_records(store, namespace)]:
        raw = _taken(store, key, listed)
        if raw is None:
            continue
        found = True
        try:
            keys = [layout.full_key(namespace, k) for k in record.chunk_keys(record.decode_record(raw, key))]
        except CorruptCheckpointError as exc:
            log.warning("%s; removing the generations no record names under %s instead", exc, namespace)
            _reclaim(store, namespace, only_namespace=True)
            continue
        _delete_keys(store, keys)
    return found


def delete(checkpoint_id: Id, *, client: Any = None, **store_options: Any) -> bool:
    """Remove a checkpoint: the record first (it stops being visible at once), then its data.

    Returns False when there was no record. Rank-local records (use_collectives=False) go too. Keys
    go in batches of UNLINK, so deleting 100k keys does not stall the server.
    """
    with catalog.Scope(checkpoint_id, client, store_options) as scope:
        return _delete(scope.store, scope.namespace)


def keep_last(
    prefix: Id, n: int, *, dry_run: bool = False, client: Any = None, **store_options: Any
) -> list[CheckpointInfo]:
    """Delete all but the ``n`` most recently committed checkpoints under ``prefix``, oldest first.

    Returns the checkpoints deleted (or, with ``dry_run``, those that would be). Newest means by step
    when every checkpoint under ``prefix`` recorded one, else by the store's commit clock, so the
    last save is never deleted for lacking a step (see :func:`list_checkpoints`). Orphaned
    generations under ``prefix`` (saves that died, see :func:`gc`) are removed too, unless ``dry_run``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise KVCheckpointError(f"keep_last needs a count of checkpoints to keep (an int >= 0), got {n!r}")
    with catalog.Scope(prefix, client, store_options) as scope:
        infos = catalog.summaries(scope)
        doomed = infos[: max(0, len(infos) - n)]
        if not dry_run:
            for old in doomed:
                _delete(scope.store, old.namespace, old)
            reclaimed = _reclaim(scope.store, scope.namespace)
            if reclaimed:
                log.info("keep_last: removed %d orphaned generation(s) of saves that died", len(reclaimed))
        return doomed
