"""KVStorageReader: DCP's StorageReader over a KVStore.

A ReadItem asks for a box of one stored tensor. When that box is one contiguous byte run (e.g. a dim-0
slice) only those bytes are fetched, widened to checksum-block boundaries, straight into the target
tensor's memory when it is a CPU tensor of the same dtype; otherwise the whole rows (dim-0 slices)
holding the box are fetched into a scratch tensor and the box copied out of it. Ranges of one key that
overlap or touch are fetched once (kvckpt.dcp.coalesce).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from kvckpt import layout, record
from kvckpt.arguments import whole
from kvckpt.checksum import DEFAULT_BLOCK_BYTES, first_bad_block
from kvckpt.dcp.coalesce import read_coalesced
from kvckpt.dcp.codec import DTYPES, decode_metadata
from kvckpt.dcp.safe_load import hand_over
from kvckpt.dcp.tensor_bytes import byte_view, contiguous_span, row_slab, writable_byte_view
from kvckpt.deadline import shared
from kvckpt.errors import (
    CheckpointChangedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KVCheckpointError,
)
from kvckpt.gcpause import paused_gc
from kvckpt.store import RangeRead
from kvckpt.target import Addressed
from kvckpt.transfer import Transfer


@dataclass
class _Read:
    """One range request plus what to check and where to copy once it lands."""

    request: RangeRead
    fqn: str
    sums: tuple[int, ...] | None
    copy_to: memoryview | None = None
    copy_from: slice | None = None


class KVStorageReader(Addressed, StorageReader):
    """Read a DCP checkpoint written by KVStorageWriter; works with any number of ranks.

    ``verify`` checks every fetched block against the record's checksums (on by default).
    ``allow_pickle=False`` refuses, whatever the planner, a non-tensor value whose unpickling would
    construct a class outside torch's weights_only allow-list; True trusts the store; None (the
    default, for plain ``dcp.load``) keeps DCP's unrestricted unpickling and warns once.
    """

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        client: Any = None,
        io_threads: int = 2,
        batch_bytes: int = 4 << 20,  # vs 16 MiB: the server's reply buffers stay in cache, 18% faster
        group_bytes: int = 64 << 20,
        verify: bool = True,
        allow_pickle: bool | None = None,
        store_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        whole("KVStorageReader", 1, io_threads=io_threads, batch_bytes=batch_bytes, group_bytes=group_bytes)
        self.allow_pickle = allow_pickle
        self.io_threads = io_threads
        self.batch_bytes = batch_bytes
        self.group_bytes = group_bytes
        self.verify = verify
        self._init_target(client, store_options)
        self._records: dict[str, tuple[bytes, dict[str, Any], Metadata]] = {}
        #: Records fetched by prefetch_metadata for the load about to start, used once.
        self._prefetched: dict[str, bytes] = {}
        self._body: dict[str, Any] = {}
        self._record_key = ""
        self._items: dict[MetadataIndex, layout.StoredItem] = {}
        self.rank: int | None = None
        if checkpoint_id is not None:
            self.reset(checkpoint_id)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._retarget(checkpoint_id)
        self._records.clear()
        self._prefetched.clear()
        self._body, self._items = {}, {}

    # Metadata ---------------------------------------------------------------------------------

    @shared
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Fetch the record every time DCP asks; decode it again only when it changed.

        A reader reused for another load of the same checkpoint_id must see an overwrite that
        happened in between, so only the decoding (the expensive part) is cached, keyed by the
        record's bytes. The one exception is a record :meth:`prefetch_metadata` fetched for the
        load now starting.
        """
        key = layout.record_key(self.target.namespace, kwargs.get("rank"))
        raw = self._prefetched.pop(key) if key in self._prefetched else self.target.store.get(key)
        if raw is None:
            self._records.pop(key, None)
            raise CheckpointNotFoundError(
                f"{self.target.display}: no committed checkpoint here (no record at {key!r}); "
                "check the checkpoint_id, or list what exists with kvckpt.list_checkpoints",
                checkpoint_id=self.target.display,
            )
        cached = self._records.get(key)
        if cached is None or cached[0] != raw:
            with paused_gc():  # decoding 10,000 entries, not fetching them (kvckpt.gcpause)
                body = record.decode_record(raw, key)
                cached = self._records[key] = (raw, body, decode_metadata(body, key))
        _, self._body, metadata = cached
        self._record_key = key
        return metadata

    def prefetch_metadata(self, rank: int | None = None) -> Metadata:
        """:meth:`read_metadata` for a caller that starts a load with this reader right after: the
        load's own first ``read_metadata`` then takes this record instead of fetching it again."""
        metadata = self.read_metadata(rank=rank)
        self._prefetched[self._record_key] = self._records[self._record_key][0]
        return metadata

    @property
    def record_body(self) -> dict[str, Any]:
        """The decoded record last read (its commit time, step, generation, …)."""
        return self._body

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        if not self._body:  # metadata came from elsewhere: still need our block size
            self.read_metadata(**({"rank": self.rank} if kwargs.get("use_collectives") is False else {}))
        self._items = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Tell the coordinator which record this rank read, and which generation it named."""
        return dataclasses.replace(plan, storage_data=(self._record_key, self._body.get("save_id")))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Every rank read its record on its own: an overwrite in between would mix generations.

        Ranks that read one record must agree on its generation; rank-local records
        (use_collectives=False) are separate records and may differ.
        """
        generations: dict[str, set[str]] = {}
        for plan in plans:
            key, save_id = plan.storage_data
            generations.setdefault(key, set()).add(str(save_id))
        for seen in generations.values():
            if len(seen) > 1:
                raise CheckpointChangedError(
                    f"{self.target.display} was overwritten while the ranks were reading it (they saw "
                    f"generations {sorted(seen)}); load it again",
                    checkpoint_id=self.target.display,
                )
        return plans

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id)

    # Data -------------------------------------------------------------------------------------

    @shared
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self._load_objects([i for i in plan.items if i.type == LoadItemType.BYTE_IO], planner)
        tensors = iter([i for i in plan.items if i.type != LoadItemType.BYTE_IO])
        while True:
            group, finishers = self._plan_group(tensors, planner)
            if not finishers:
                break
            self._run(group, finishers)
        self._records.clear()  # a reader kept between loads does not hold a decoded record
        self._prefetched.clear()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @paused_gc()
    def _plan_group(
        self, items: Iterator[ReadItem], planner: LoadPlanner
    ) -> tuple[list[_Read], list[Callable[[], None]]]:
        """The reads of the next items up to ``group_bytes``, and what finishes each item once they
        landed. Planning allocates several objects per item, so the collector is paused while it
        runs, never while the reads wait on the store (kvckpt.gcpause)."""
        group: list[_Read] = []
        finishers: list[Callable[[], None]] = []
        size = 0
        for item in items:
            reads, finish = self._plan_item(item, planner)
            group += reads
            finishers.append(finish)
            size += sum(r.request.into.nbytes for r in reads)
            if size >= self.group_bytes:
                break
        return group, finishers

    def _stored(self, item: ReadItem) -> layout.StoredItem:
        try:
            return self._items[item.storage_index]
        except KeyError:
            raise CorruptCheckpointError(
                f"{self.target.display}: the record has no stored data for {item.storage_index.fqn!r} "
                f"at offset {tuple(item.storage_index.offset or ())}",
                fqn=item.storage_index.fqn,
            ) from None

    def _plan_item(self, item: ReadItem, planner: LoadPlanner) -> tuple[list[_Read], Callable[[], None]]:
        stored = self._stored(item)
        fqn = item.storage_index.fqn
        if stored.dtype is None or stored.shape is None:
            raise CorruptCheckpointError(f"{self.target.display}: {fqn!r} is stored as bytes, not a tensor")
        dtype = DTYPES[stored.dtype]
        target = planner.resolve_tensor(item).detach()
        lengths = tuple(item.lengths)
        if tuple(target.shape) != lengths:
            raise KVCheckpointError(
                f"{fqn!r}: the planner's target has shape {tuple(target.shape)} but {lengths} was asked for"
            )
        if any(
            o < 0 or o + n > size
            for o, n, size in zip(item.storage_offsets, lengths, stored.shape, strict=True)
        ):
            raise CorruptCheckpointError(
                f"{self.target.display}: the record stores {fqn!r} with shape {stored.shape}, which "
                f"does not hold the region at {tuple(item.storage_offsets)} of size {lengths}",
                key=self._record_key,
                fqn=fqn,
            )
        element = dtype.itemsize
        span = contiguous_span(stored.shape, tuple(item.storage_offsets), lengths)
        if span is not None:
            start, stop = span[0] * element, span[1] * element
            direct = writable_byte_view(target) if target.dtype == dtype else None
            scratch = None if direct is not None else torch.empty(lengths, dtype=dtype)
            dest = direct if direct is not None else byte_view(scratch, writable=True)  # type: ignore[arg-type]
            reads = self._span_reads(stored, start, stop, dest, fqn)

            def finish_span() -> None:
                if scratch is not None:
                    target.copy_(scratch)
                planner.commit_tensor(item, target)

            return reads, finish_span

        start, stop = row_slab(stored.shape, tuple(item.storage_offsets), lengths)
        rows = torch.empty((lengths[0], *stored.shape[1:]), dtype=dtype)
        reads = self._span_reads(stored, start * element, stop * element, byte_view(rows, writable=True), fqn)

        def finish_box() -> None:
            box = rows
            for dim in range(1, len(lengths)):
                box = box.narrow(dim, item.storage_offsets[dim], lengths[dim])
            target.copy_(box)
            planner.commit_tensor(item, target)

        return reads, finish_box

    def _load_objects(self, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Non-tensor values, fetched whole (a pack once for all its items): memory follows what is
        stored, not what the record claims. A value must be as long as the record's chunks in it."""
        if not items:
            return
        namespace = self.target.namespace
        wanted = [(item, self._stored(item)) for item in items]
        keys = list(dict.fromkeys(c.key for _, stored in wanted for c in stored.chunks))
        # The store splits the batch as its server needs.
        values = self.target.store.get_many([layout.full_key(namespace, k) for k in keys])
        found = dict(zip(keys, values, strict=True))
        ends = dict.fromkeys(keys, 0)
        for chunk in (c for stored in self._items.values() for c in stored.chunks if c.key in ends):
            ends[chunk.key] = max(ends[chunk.key], chunk.end)
        for item, stored in wanted:
            parts = []
            for chunk in stored.chunks:
                value = memoryview(found[chunk.key] or b"")
                data = value[chunk.offset : chunk.end]
                extra = len(value) - ends[chunk.key]  # > 0: longer than the record says
                count = chunk.nbytes + extra if extra > 0 else len(data)
                key = layout.full_key(namespace, chunk.key)
                self._check(key, item.storage_index.fqn, chunk.offset, data, count, chunk.nbytes, chunk.sums)
                parts.append(data)
            hand_over(planner, item, b"".join(parts), self.allow_pickle)

    def _span_reads(
        self, stored: layout.StoredItem, start: int, stop: int, dest: memoryview, fqn: str
    ) -> list[_Read]:
        """Requests covering item bytes [start, stop) into ``dest``, widened to whole checksum blocks."""
        block = int(self._body.get("block_bytes") or DEFAULT_BLOCK_BYTES)
        namespace = self.target.namespace
        reads = []
        for chunk_start, chunk in stored.chunk_spans():
            lo, hi = max(start, chunk_start), min(stop, chunk_start + chunk.nbytes)
            if lo >= hi:
                continue
            local_lo, local_hi = lo - chunk_start, hi - chunk_start
            part = dest[lo - start : hi - start]
            key, at = layout.full_key(namespace, chunk.key), chunk.offset  # where the chunk starts in key
            if not (self.verify and chunk.sums):
                reads.append(_Read(RangeRead(key, at + local_lo, part), fqn, None))
                continue
            first, last = local_lo // block, -(-local_hi // block)  # blocks of the chunk's own bytes
            wide_lo, wide_hi = first * block, min(last * block, chunk.nbytes)
            sums = chunk.sums[first:last]
            if (wide_lo, wide_hi) == (local_lo, local_hi):
                reads.append(_Read(RangeRead(key, at + wide_lo, part), fqn, sums))
            else:
                scratch = memoryview(bytearray(wide_hi - wide_lo))
                window = slice(local_lo - wide_lo, local_hi - wide_lo)
                reads.append(_Read(RangeRead(key, at + wide_lo, scratch), fqn, sums, part, window))
        return reads

    def _run(self, reads: list[_Read], finishers: list[Callable[[], None]]) -> None:
        ops = self.target.store.capabilities.max_batch_ops
        reads.sort(key=lambda read: (read.request.key, read.request.offset))  # overlaps share a batch
        with Transfer(self.io_threads) as transfer:
            batch: list[_Read] = []
            size = 0
            for read in reads:
                batch.append(read)
                size += read.request.into.nbytes
                if size >= self.batch_bytes or len(batch) >= ops:
                    transfer.submit(self._fetch, batch)
                    batch, size = [], 0
            if batch:
                transfer.submit(self._fetch, batch)
        for finish in finishers:
            finish()

    def _fetch(self, reads: list[_Read]) -> None:
        counts = read_coalesced(self.target.store, [r.request for r in reads])
        for read, count in zip(reads, counts, strict=True):
            request = read.request
            self._check(
                request.key, read.fqn, request.offset, request.into, count, request.into.nbytes, read.sums
            )
            if read.copy_to is not None and read.copy_from is not None:
                read.copy_to[:] = request.into[read.copy_from]

    def _check(
        self,
        key: str,
        fqn: str,
        offset: int,
        data: memoryview,
        count: int,
        wanted: int,
        sums: tuple[int, ...] | None,
    ) -> None:
        """``count`` bytes arrived from ``offset`` of ``key`` where ``wanted`` were due; verify them."""
        if count != wanted:
            self._raise_if_changed()
            what = "is missing or truncated" if count < wanted else "is longer than the record says"
            raise CorruptCheckpointError(
                f"{self.target.display}: chunk {key!r} of {fqn!r} {what} "
                f"(got {count} of {wanted} bytes at offset {offset})",
                key=key,
                fqn=fqn,
            )
        if self.verify and sums:
            block = int(self._body.get("block_bytes") or DEFAULT_BLOCK_BYTES)
            bad = first_bad_block(data, block, sums)
            if bad is not None:
                raise CorruptCheckpointError(
                    f"{self.target.display}: checksum mismatch in {fqn!r}, key {key!r} "
                    f"(block {bad} from offset {offset}); the stored bytes are damaged",
                    key=key,
                    fqn=fqn,
                )

    def _raise_if_changed(self) -> None:
        """A chunk is missing: when the record has been replaced or deleted meanwhile, say that."""
        try:
            raw = self.target.store.get(self._record_key)
            now = None if raw is None else record.decode_record(raw, self._record_key).get("save_id")
        except KVCheckpointError:
            return  # cannot tell: the missing chunk is reported as it is
        if now != self._body.get("save_id"):
            raise CheckpointChangedError(
                f"{self.target.display} was {'deleted' if raw is None else 'overwritten'} while being "
                "loaded, so the data this load started from is gone; nothing was mixed: load it again",
                checkpoint_id=self.target.display,
            )
