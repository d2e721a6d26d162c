"""Packing request ops into txns that etcd accepts: at most ``--max-txn-ops`` ops and
``--max-request-bytes`` bytes each (docs/etcd.md), so a batch of any size goes out as a few txns;
and the error for what fits in none."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from kvckpt.errors import KVCheckpointError
from kvckpt.stores.etcd import wire as pb

#: Room kept in every txn for etcd's own raft request header (id, user name, auth revision).
RAFT_HEADER_BYTES = 1024


def txn_batches(
    ops: Sequence[tuple[str, pb.Parts]],
    max_request_bytes: int,
    max_ops: int,
    too_large: Callable[[str, int], Exception],
) -> Iterator[list[pb.Parts]]:
    """Group ``(key, op)`` pairs into txns within both limits; ``too_large(key, bytes)`` is raised
    for an op that fits in no txn at all."""
    budget = max_request_bytes - RAFT_HEADER_BYTES
    batch: list[pb.Parts] = []
    used = 0
    for key, op in ops:
        cost = pb.size(op) + 6  # the success-branch tag and length around the op
        if cost > budget:
            raise too_large(key, cost)
        if batch and (len(batch) >= max_ops or used + cost > budget):
            yield batch
            batch, used = [], 0
        batch.append(op)
        used += cost
    if batch:
        yield batch


def too_large(description: str, key: str, nbytes: int, max_value: int, max_request: int) -> KVCheckpointError:
    """The error for a value no request can carry, saying which server setting to raise."""
    return KVCheckpointError(
        f"{description}: the value for {key!r} is {nbytes} bytes, over this store's "
        f"max_value_bytes={max_value} (max_request_bytes={max_request} less room for the key). Split "
        "the value into smaller chunks, or raise --max-request-bytes on every etcd member and pass "
        "the same max_request_bytes=",
        limit=max_value,
        size=nbytes,
    )
