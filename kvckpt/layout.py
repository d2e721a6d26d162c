"""Where things live in the store, and what the record says about each stored item.

    NAMESPACE/.metadata                          the commit record (collective saves)
    NAMESPACE/__R.metadata                       rank R's record (use_collectives=False)
    NAMESPACE/SAVE_ID/FQN/OFFSETS/N              chunk N of one stored item
    NAMESPACE/SAVE_ID/.pack/N                    pack N: small items of one rank, end to end
    NAMESPACE/.live/SAVE_ID                      a save in progress proves it is alive (short expiry)
    NAMESPACE/.unfinished                        the id of the last save that began and has not
                                                 committed (pending expiry): a hint to look for orphans

Keys in the record are relative to the namespace, so a checkpoint can be copied to another one.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

RECORD_NAME = ".metadata"
PACK_NAME = ".pack"
LIVE_NAME = ".live"
UNFINISHED_NAME = ".unfinished"
#: A generation directory (new_save_id): every data key of one save lives under one.
GENERATION = re.compile(r"g\d{8}T\d{6}-[0-9a-f]{8}")


def record_key(namespace: str, rank: int | None = None) -> str:
    return f"{namespace}/{RECORD_NAME}" if rank is None else f"{namespace}/__{rank}{RECORD_NAME}"


def live_key(namespace: str, save_id: str) -> str:
    """The marker a save in progress keeps refreshing, beside (not inside) its generation, so the
    generation's directory holds data keys only."""
    return f"{namespace}/{LIVE_NAME}/{save_id}"


def unfinished_key(namespace: str) -> str:
    """Set when a save begins, cleared when it commits: while it stands, an earlier save here may
    have died and left an orphan. Finding orphans means listing keys, which on Redis is a SCAN of
    the whole keyspace; the next save looks only when this says there may be something to find."""
    return f"{namespace}/{UNFINISHED_NAME}"


def new_save_id() -> str:
    """Sortable by time, unique by randomness: the generation every key of one save lives under."""
    return time.strftime("g%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def item_prefix(save_id: str, fqn: str, offset: tuple[int, ...] | None) -> str:
    if offset is None:
        where = "bytes"
    elif not offset:
        where = "scalar"
    else:
        where = ",".join(map(str, offset))
    return f"{save_id}/{fqn}/{where}"


def pack_key(save_id: str, n: int) -> str:
    """Pack ``n`` of a generation. Two segments below the generation where an item's chunk keys have
    at least three (FQN, OFFSETS, N), so no FQN, whatever it holds, can name a pack's key."""
    return f"{save_id}/{PACK_NAME}/{n}"


def full_key(namespace: str, relative: str) -> str:
    return f"{namespace}/{relative}"


@dataclass(frozen=True)
class StoredChunk:
    """``nbytes`` bytes of the value at ``key`` (relative to the namespace) from ``offset`` on, and
    the checksums of their blocks. ``offset`` is 0 for a chunk that is a whole value; small items
    share one value (a pack) and each starts where the previous one ended."""

    key: str
    nbytes: int
    sums: tuple[int, ...] = ()
    offset: int = 0

    @property
    def end(self) -> int:
        """Where the chunk ends in its value: a value is as long as the furthest end in it."""
        return self.offset + self.nbytes


@dataclass(frozen=True)
class StoredItem:
    """The bytes of one DCP write item (a tensor shard or a BYTE_IO blob), split into chunks.

    ``dtype``/``shape`` describe the raw tensor bytes (row-major); both are None for BYTE_IO.
    """

    nbytes: int
    chunks: tuple[StoredChunk, ...]
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def chunk_spans(self) -> list[tuple[int, StoredChunk]]:
        """(start offset within the item, chunk) pairs."""
        spans, start = [], 0
        for chunk in self.chunks:
            spans.append((start, chunk))
            start += chunk.nbytes
        return spans
