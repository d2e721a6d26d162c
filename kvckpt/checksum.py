"""Per-block checksums. Blocks (not whole chunks) so a range read can still be verified."""

from __future__ import annotations

import xxhash

ALGORITHM = "xxh3_64"
DEFAULT_BLOCK_BYTES = 1 << 20


def block_sums(data: memoryview, block: int) -> list[int]:
    """xxh3_64 of each ``block``-sized slice of ``data`` (the last one may be short)."""
    digest = xxhash.xxh3_64_intdigest
    return [digest(data[i : i + block]) for i in range(0, len(data), block)] or [digest(b"")]


def first_bad_block(data: memoryview, block: int, expected: list[int] | tuple[int, ...]) -> int | None:
    """Index of the first block of ``data`` whose checksum differs, or None when all match."""
    for index, actual in enumerate(block_sums(data, block)):
        if index >= len(expected) or actual != expected[index]:
            return index
    return None
