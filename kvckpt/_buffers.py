"""Byte views and the key codec, one copy each for every backend.

Keys are str in kvckpt and bytes on the wire: UTF-8 with surrogateescape, so a key read back from a
server that holds non-UTF-8 bytes round-trips instead of failing.
"""

from __future__ import annotations

from kvckpt.store import Buffer


def flat_view(value: Buffer) -> memoryview:
    """A flat byte view: sizes are counted in bytes even for a memoryview of wide items."""
    view = value if isinstance(value, memoryview) else memoryview(value)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def key_str(key: memoryview | bytes | str) -> str:
    return key if isinstance(key, str) else bytes(key).decode("utf-8", "surrogateescape")
