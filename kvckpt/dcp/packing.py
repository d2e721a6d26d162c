"""Small items share values (packs), so a save of many small tensors writes few keys.

Every key costs the server a request and memory beside its value (a dictionary entry, an object
header, and on a jemalloc server the rounding of a 4 KiB value up to a 5 KiB size class), the commit
a PERSIST, and a load a request. An item smaller than ``pack_below`` is copied into the current pack
of its rank instead of getting a key of its own; a pack closes when the next item would take it
past the writer's ``chunk_bytes`` (less HEADROOM), so a pack never splits an item. Each packed item
keeps its own block checksums and records where it starts in its pack (``StoredChunk.offset``), so
a load or a verify reads and checks one item's bytes without its neighbours, and a load that wants
a whole pack reads it in a few large requests (kvckpt.dcp.coalesce merges touching ranges of one
key).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import torch
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from kvckpt import layout
from kvckpt.checksum import block_sums
from kvckpt.dcp.codec import dtype_name
from kvckpt.dcp.tensor_bytes import byte_view, host_contiguous
from kvckpt.errors import KVCheckpointError

#: Items below this many bytes are packed by default (docs/performance.md, "Packing small items").
DEFAULT_PACK_BELOW = 64 << 10
#: A pack ends this far below ``chunk_bytes``: the server stores a value with a header of its own,
#: and a value of exactly 4 MiB would take the allocator's next size class (5 MiB with jemalloc).
HEADROOM = 64


class Values:
    """The values one rank's save writes: each large item's chunks, and packs of the small ones,
    filled in the order the items come. ``block_bytes`` None: no checksums."""

    def __init__(
        self, namespace: str, save_id: str, below: int, chunk_bytes: int, block_bytes: int | None
    ) -> None:
        self.namespace = namespace
        self.save_id = save_id
        self.chunk_bytes = chunk_bytes
        self.pack_bytes = max(1, chunk_bytes - HEADROOM)
        self.below = min(below, self.pack_bytes + 1)  # an item larger than a pack is chunked as usual
        self.block_bytes = block_bytes
        self._packs = 0
        self._buffer = bytearray()

    def of_item(
        self, prefix: str, view: memoryview, chunks: list[layout.StoredChunk]
    ) -> Iterator[tuple[str, memoryview]]:
        """The values to write, as (full key, bytes), once the item ``view`` under ``prefix`` has
        been taken: its own chunks, or the pack it closed to make room for it (``view`` is copied
        into the next). What records its bytes is appended to ``chunks`` (none for an empty item)."""
        if 0 < len(view) < self.below:
            if len(self._buffer) + len(view) > self.pack_bytes:
                yield from self.rest()
            chunks.append(self._chunk(layout.pack_key(self.save_id, self._packs), view, len(self._buffer)))
            self._buffer += view
            return
        for n, start in enumerate(range(0, len(view), self.chunk_bytes)):
            piece = view[start : start + self.chunk_bytes]
            chunks.append(self._chunk(f"{prefix}/{n}", piece, 0))
            yield layout.full_key(self.namespace, f"{prefix}/{n}"), piece

    def rest(self) -> Iterator[tuple[str, memoryview]]:
        """The pack being filled, if any; the next item starts a new one."""
        if self._buffer:
            key = layout.full_key(self.namespace, layout.pack_key(self.save_id, self._packs))
            buffer, self._buffer = self._buffer, bytearray()  # it stays alive in its batch until sent
            self._packs += 1
            yield key, memoryview(buffer)

    def _chunk(self, key: str, view: memoryview, offset: int) -> layout.StoredChunk:
        sums = () if self.block_bytes is None else tuple(block_sums(view, self.block_bytes))
        return layout.StoredChunk(key, len(view), sums, offset)


def values(
    plan: SavePlan, planner: SavePlanner, into: Values, results: list[WriteResult]
) -> Iterator[tuple[str, memoryview]]:
    """Every value of the plan's items as (key, bytes), one item at a time, so only the values in
    flight are held; an item's WriteResult joins ``results`` once all its bytes were taken."""
    for item in plan.items:
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise KVCheckpointError(f"{item.index.fqn}: planner gave {type(data)} for a BYTE_IO item")
            view, dtype, shape, offset = data.getbuffer(), None, None, None
        else:
            assert isinstance(data, torch.Tensor)
            tensor = host_contiguous(data)
            view, dtype, shape = byte_view(tensor), dtype_name(tensor.dtype), tuple(tensor.shape)
            offset = tuple(item.index.offset or ())
        prefix = layout.item_prefix(into.save_id, item.index.fqn, offset)
        chunks: list[layout.StoredChunk] = []
        yield from into.of_item(prefix, view, chunks)
        stored = layout.StoredItem(len(view), tuple(chunks), dtype, shape)
        results.append(WriteResult(index=item.index, size_in_bytes=len(view), storage_data=stored))
    yield from into.rest()
