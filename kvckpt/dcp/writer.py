"""KVStorageWriter: DCP's StorageWriter over a KVStore.

Every rank writes its items' raw bytes under a fresh generation (save_id) with a pending expiry; the
coordinator then makes the data permanent (or gives it the user's ttl) and commits the record last,
put-if-absent or as an atomic swap. A save that dies anywhere leaves no record and only expiring data.

DCP calls a writer's steps separately (prepare_global_plan, write_data, finish), so the writer keeps
its save's deadline (kvckpt.deadline) across them: every store operation of the save, cleanup after a
failure included, shares it, and a hung store fails the save within its total_timeout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from kvckpt import layout, record
from kvckpt.arguments import seconds, whole
from kvckpt.checksum import ALGORITHM, DEFAULT_BLOCK_BYTES
from kvckpt.dcp.codec import encode_metadata
from kvckpt.dcp.packing import DEFAULT_PACK_BELOW, Values, values
from kvckpt.deadline import Deadline, using
from kvckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    KVCheckpointError,
)
from kvckpt.gcpause import paused_gc
from kvckpt.management import orphans
from kvckpt.protocol.commit import Committer, discard, left_to_gc, retire
from kvckpt.protocol.heartbeat import DEFAULT_LIVE_TTL, Heartbeat
from kvckpt.store import Buffer, KVStore
from kvckpt.target import Addressed
from kvckpt.transfer import Transfer

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
#: Uncommitted data expires after this many seconds, so a crashed save cleans itself up.
DEFAULT_PENDING_TTL = 6 * 3600.0
#: Committed data outlives its record by this margin, so no reader sees a record without its data.
TTL_MARGIN = 60.0

W = TypeVar("W", bound="KVStorageWriter")
P = ParamSpec("P")
R = TypeVar("R")


def _step(method: Callable[Concatenate[W, P], R]) -> Callable[Concatenate[W, P], R]:
    """A DCP step of the save, under the save's deadline. Its start is progress: the time since the
    last step was DCP's (planning, waiting for other ranks), not the store's. A failure whose
    cleanup could not finish says what it left to kvckpt.gc and expiry."""

    def step(self: W, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self._left = []
        self._deadline.progress()
        with using(self._deadline):
            try:
                return method(self, *args, **kwargs)
            except BaseException as exc:
                if self._left:
                    left_to_gc(exc, self._left)
                raise

    functools.update_wrapper(step, method)
    return step


class KVStorageWriter(Addressed, StorageWriter):
    """Write a DCP checkpoint into Redis, Redis Cluster or etcd.

    ``checkpoint_id`` is a URL (``redis://host:6379/0/run1/step100``), or with ``client=`` the bare
    namespace. ``overwrite`` replaces a committed checkpoint atomically; ``ttl`` (seconds) expires it.
    ``chunk_bytes`` splits large tensors into values of that size, and items under ``pack_below``
    bytes share values of about that size (0: each item gets its own); ``io_threads`` connections
    move them in parallel. ``min_replicas`` waits (Redis WAIT, ``replica_timeout`` s) until that
    many replicas hold the data before the commit, and the commit after it. A server whose
    maxmemory-policy may evict keys is refused unless ``allow_eviction`` (then only warned about).
    ``store_options`` go to the backend (timeouts, TLS files, …). ``step`` is recorded and orders
    ``latest``/``keep_last``. While the save runs, a marker refreshed within ``live_ttl`` seconds
    proves it alive to ``kvckpt.gc``; a save whose marker lapsed refuses to commit.
    """

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        client: Any = None,
        overwrite: bool = False,
        ttl: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pack_below: int = DEFAULT_PACK_BELOW,
        io_threads: int = 2,
        batch_bytes: int = 16 << 20,
        checksums: bool = True,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        pending_ttl: float | None = DEFAULT_PENDING_TTL,
        min_replicas: int = 0,
        replica_timeout: float = 10.0,
        allow_eviction: bool = False,
        store_options: dict[str, Any] | None = None,
        step: int | None = None,
        live_ttl: float = DEFAULT_LIVE_TTL,
    ) -> None:
        super().__init__()
        whole("KVStorageWriter", 0, none=True, step=step)
        whole("KVStorageWriter", 0, min_replicas=min_replicas, pack_below=pack_below)
        whole("KVStorageWriter", 1, io_threads=io_threads, chunk_bytes=chunk_bytes, block_bytes=block_bytes)
        whole("KVStorageWriter", 1, batch_bytes=batch_bytes)
        seconds("KVStorageWriter", live_ttl=live_ttl, replica_timeout=replica_timeout)
        seconds("KVStorageWriter", none=True, ttl=ttl, pending_ttl=pending_ttl)
        self.step = step
        self.live_ttl = live_ttl
        #: (commit time, store commit clock) to record instead of now: a copy keeps its source's place
        #: in the order. The clock is None when the source's was another store's (docs/protocol.md).
        self.source_order: tuple[float, float | None] | None = None
        self._heartbeat: Heartbeat | None = None
        #: The Metadata the last commit recorded (on the rank that committed): DCP's own, which
        #: dcp.save returns, is left as DCP made it, since DCP may hand it to the next save.
        self.recorded: Metadata | None = None
        self._deadline = Deadline()
        #: What this step's cleanup after a failure could not remove (left to kvckpt.gc and expiry).
        self._left: list[str] = []
        self.overwrite = overwrite
        self.ttl = ttl
        self.chunk_bytes = chunk_bytes
        self.pack_below = pack_below
        self.io_threads = io_threads
        self.batch_bytes = batch_bytes
        self.checksums = checksums
        self.block_bytes = block_bytes
        self.pending_ttl = pending_ttl
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        self.allow_eviction = allow_eviction
        self._init_target(client, store_options)
        self._save_id = layout.new_save_id()
        #: This save's generation, drawn by prepare_global_plan on the rank that ran it, else None.
        self._generation: str | None = None
        #: Ranks in this save, known to the rank that ran prepare_global_plan (else 0).
        self._ranks = 0
        self._rank: int | None = None
        self._use_collectives = True
        if checkpoint_id is not None:
            self.reset(checkpoint_id)

    # Identity --------------------------------------------------------------------------------

    @property
    def record_key(self) -> str:
        rank = None if self._use_collectives or self._rank is None else self._rank
        return layout.record_key(self.target.namespace, rank)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        with using(self._deadline):  # the previous save's
            self._end_live()  # a save that failed elsewhere never reached finish
        self._retarget(checkpoint_id)
        self._save_id = layout.new_save_id()

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self._save_id)

    # Planning ---------------------------------------------------------------------------------

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self._rank = kwargs.get("rank")
        self._use_collectives = kwargs.get("use_collectives", True)
        self._generation = None  # a reused writer starts every save without one
        self._ranks = 0
        self._deadline = Deadline()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    @_step
    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Runs on the coordinator: refuse early (before any data moves) and pick the generation."""
        self.target.store.check_server_settings(allow_eviction=self.allow_eviction)
        if self.min_replicas:  # missing replicas fail the save before any data moves
            self._wait_for_replicas(self.target.store)
        if not self.overwrite and self.target.store.exists(self.record_key):
            raise CheckpointExistsError(
                f"Checkpoint already exists: {self.target.display} holds a committed checkpoint; pass "
                "overwrite=True to replace it or choose another checkpoint_id",
                checkpoint_id=self.target.display,
            )
        self.target.store.check_total_bytes(
            sum(item.tensor_storage_size() or 0 for plan in plans for item in plan.items)
        )
        self._save_id = self._generation = layout.new_save_id()
        self._ranks = len(plans)
        self._begin_live(self.target.store)
        return plans

    # Data -------------------------------------------------------------------------------------

    @_step
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items under a generation that is fresh for this save.

        The generation never comes from ``plan``: with DCP's plan caching the plan is a previous
        save's final plan, ``storage_data`` included, and on ranks other than the coordinator
        ``prepare_global_plan`` does not run at all. So the rank that drew a generation in
        ``prepare_global_plan`` during this save uses it; every other rank draws its own. The
        record lists every key, so ranks need not share one.
        """
        save_id, self._generation = self._generation or layout.new_save_id(), None
        store = self.target.store
        pending = self._pending_ttl(store)
        write_ttl = pending if pending is not None else self._data_ttl()
        results: list[WriteResult] = []
        submitted: list[str] = []
        pieces = self._pieces(plan, planner, save_id, results)
        try:
            with Transfer(self.io_threads) as transfer:
                while batch := self._next_batch(pieces, store.capabilities.max_batch_ops):
                    submitted.extend(key for key, _ in batch)
                    transfer.submit(functools.partial(store.put_many, batch, ttl=write_ttl))
        except BaseException:
            if self._discard(store, submitted) and self._ranks == 1:  # then that was all of its data
                self._clear_unfinished(store)
            self._end_live()  # the coordinator's own failure: this save will not commit
            raise
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    @paused_gc()
    def _next_batch(self, pieces: Iterator[tuple[str, memoryview]], max_ops: int) -> list[tuple[str, Buffer]]:
        """The next ``put_many`` batch, empty at the end. The collector is paused while it is built,
        never while it travels (kvckpt.gcpause: training may run beside the upload)."""
        batch: list[tuple[str, Buffer]] = []
        size = 0
        for key, piece in pieces:
            batch.append((key, piece))
            size += len(piece)
            if size >= self.batch_bytes or len(batch) >= max_ops:
                break
        return batch

    def _pieces(
        self, plan: SavePlan, planner: SavePlanner, save_id: str, results: list[WriteResult]
    ) -> Iterator[tuple[str, memoryview]]:
        """Every value of the plan's items as (key, bytes) (kvckpt.dcp.packing.values)."""
        limit = min(self.chunk_bytes, self.target.store.capabilities.max_value_bytes)
        sums = self.block_bytes if self.checksums else None
        return values(
            plan, planner, Values(self.target.namespace, save_id, self.pack_below, limit, sums), results
        )

    # Commit -----------------------------------------------------------------------------------

    @_step
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        store = self.target.store
        metadata, keys, body = self._record(metadata, results)
        try:
            hint = store.get(self.record_key) if self.overwrite else None  # to retire if a reply is lost
            if self._pending_ttl(store) is not None:
                self._settle_expiry(store, keys)
            if self.min_replicas:  # the data, and its settled expiry, must survive a failover first
                self._wait_for_replicas(store)
            if self.source_order is not None:
                body["commit_clock"] = self.source_order[1]
            elif store.capabilities.conditional_commit:  # one clock orders commits: the store's
                body["commit_clock"] = store.clock(self.record_key)
            self._commit(store, record.encode_record(body), keys, hint)
            self.recorded = metadata
        finally:
            self._end_live()
        self._clear_unfinished(store)
        if self.min_replicas:
            self._wait_for_replicas(store)

    @paused_gc()
    def _record(
        self, metadata: Metadata, results: list[list[WriteResult]]
    ) -> tuple[Metadata, list[str], dict[str, Any]]:
        """The Metadata to record, every data key, and the record's body: built with the collector
        paused (kvckpt.gcpause), which the commit's waits on the store are not."""
        items: dict[MetadataIndex, layout.StoredItem] = {
            result.index: result.storage_data for rank_results in results for result in rank_results
        }
        # A copy: with plan caching DCP hands every save the same cached Metadata object, so what
        # this save records (its own id and generation) must never be written into it.
        metadata = dataclasses.replace(
            metadata,
            storage_data=items,
            version=CURRENT_DCP_VERSION,  # as FileSystemWriter records it; DCP's planners read it back
            storage_meta=self._storage_meta_of(metadata.storage_meta),
        )
        ns = self.target.namespace  # each key once: the chunks of a pack share it
        keys = list(dict.fromkeys(layout.full_key(ns, c.key) for i in items.values() for c in i.chunks))
        now = time.time()
        body = {
            "save_id": self._save_id,
            "created": now if self.source_order is None else self.source_order[0],
            "step": self.step,
            "world_size": len(results),
            "rank": None if self._use_collectives else self._rank,
            "checksum": ALGORITHM if self.checksums else None,
            "block_bytes": self.block_bytes,
            "ttl": self.ttl,
            "expires_at": None if self.ttl is None else now + self.ttl,
            "total_bytes": sum(item.nbytes for item in items.values()),
            "num_keys": len(keys),
            **encode_metadata(metadata, items),
        }
        return metadata, keys, body

    def _storage_meta_of(self, given: StorageMeta | None) -> StorageMeta:
        """This save's StorageMeta: DCP's (it asked before planning, when this save's generation was
        not yet chosen, and a cached plan carries an earlier save's) with this save's id and
        generation; torch 2.13's default planner drops it, and `kvckpt ls` shows it."""
        own = self.storage_meta()
        assert own is not None
        if given is None:
            return own
        return dataclasses.replace(given, checkpoint_id=own.checkpoint_id, save_id=own.save_id)

    def _commit(self, store: KVStore, data: bytes, keys: list[str], hint: bytes | None) -> None:
        """Commit the record, only while this save's marker lives (docs/protocol.md, the commit)."""
        committer = Committer(
            store, self.record_key, self.target.display, self.overwrite, self.ttl, self.live_ttl,
            functools.partial(self._abandon, store),
        )  # fmt: skip
        marker = None
        if self._heartbeat is not None:
            self._heartbeat.halt()  # from here on the marker only waits to be consumed by the commit
            marker = self._heartbeat.key
        try:
            outcome = committer.commit(data, keys, hint, marker)
        finally:
            if committer.marker_settled:
                self._heartbeat = None
        if outcome.previous is not None:
            retire(store, self.target.namespace, outcome.previous, set(keys))

    # Liveness (kvckpt.protocol.heartbeat): what keeps kvckpt.gc away from this save -------------------

    def _begin_live(self, store: KVStore) -> None:
        """Before any data of the new generation is written: reclaim what earlier saves to this
        namespace left when they died (kvckpt.management.orphans.before_save), then mark this save alive for
        as long as it runs."""
        self._end_live()
        try:
            reclaimed = orphans.before_save(
                store, self.target.namespace, self._save_id, self._pending_ttl(store)
            )
        except KVCheckpointError as exc:  # reclaiming is a courtesy: the save itself may still fit
            log.warning("%s: could not look for orphaned generations: %s", self.target.display, exc)
        else:
            if reclaimed:
                log.warning(
                    "%s: removed %d orphaned generation(s) (%d bytes) left by saves that died",
                    self.target.display,
                    len(reclaimed),
                    sum(o.nbytes for o in reclaimed),
                )
        marker = store.colocated(layout.live_key(self.target.namespace, self._save_id), self.record_key)
        self._heartbeat = Heartbeat(store, marker, self.live_ttl)
        self._heartbeat.start()

    def _clear_unfinished(self, store: KVStore) -> None:
        try:
            orphans.after_save(store, self.target.namespace, self._save_id)
        except KVCheckpointError as exc:  # the marker only costs the next save one look
            log.debug("%s: could not clear its .unfinished marker: %s", self.target.display, exc)
            self._left.append("its .unfinished marker")

    def _end_live(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and not heartbeat.stop():
            self._left.append(f"its liveness marker (expires within live_ttl={self.live_ttl:g}s)")

    def _discard(self, store: KVStore, keys: list[str]) -> bool:
        """Remove this failed save's ``keys`` (kvckpt.protocol.commit.discard); True when all are gone."""
        if discard(store, keys):
            return True
        self._left.append("its data (expires after pending_ttl)" if self._pending_ttl(store) else "its data")
        return False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_heartbeat"] = None  # a thread does not travel to another process
        return state

    def _wait_for_replicas(self, store: KVStore) -> None:
        fence = layout.full_key(self.target.namespace, ".kvckpt-wait")  # inside the namespace, for ACLs
        store.wait_for_replicas(self.min_replicas, self.replica_timeout, fence)

    def _pending_ttl(self, store: KVStore) -> float | None:
        return self.pending_ttl if store.capabilities.cheap_expiry else None

    def _data_ttl(self) -> float | None:
        return None if self.ttl is None else self.ttl + TTL_MARGIN

    def _settle_expiry(self, store: KVStore, keys: list[str]) -> None:
        """Make pending data permanent (or give it the user's ttl); every key must still exist."""
        step = store.capabilities.max_batch_ops
        missing: list[str] = []
        try:
            for start in range(0, len(keys), step):
                part = keys[start : start + step]
                present = store.expire_many(part, self._data_ttl())
                missing += [key for key, ok in zip(part, present, strict=True) if not ok]
        except KVCheckpointError:  # keys already made permanent must not outlive the failed save
            self._discard(store, keys)
            raise
        if missing:
            self._discard(store, keys)
            raise CorruptCheckpointError(
                f"{self.target.display}: {len(missing)} data key(s) vanished before the commit, e.g. "
                f"{missing[0]!r} (evicted by the server's maxmemory-policy, deleted, or older than "
                "pending_ttl); nothing was committed",
                key=missing[0],
            )

    def _abandon(self, store: KVStore, keys: list[str]) -> None:
        """This save will not commit: remove all its data (``keys``, every rank's), and then its
        ``.unfinished`` marker, since it left nothing for the next save to look for."""
        if self._discard(store, keys):
            self._clear_unfinished(store)
