"""Pausing Python's cyclic garbage collector while kvckpt builds or decodes many small objects.

A training process holds hundreds of thousands of tracked objects (tensors, modules, optimizer state);
every full collection walks all of them. Encoding or decoding the record of a 10,000-tensor checkpoint
allocates enough objects to trigger several such collections: measured, 0.4 s of GC for 0.04 s of
work. The objects kvckpt creates are acyclic, so deferring collection loses nothing.

The pause is process-wide, so it wraps only the building, never a wait on the store: a thread-based
``dcp.async_save`` uploads beside the training thread, which would run without the collector meanwhile.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic GC for the block; nesting and threads restore it once, after the last exit."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
