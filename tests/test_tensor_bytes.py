"""Tensor memory as bytes: zero-copy, read-only for saving, writable for loading, alive while viewed.

torch's wheel does not depend on numpy, and nothing kvckpt installs pulls it in, so the byte views
must work without it: a save and a load run in a process where ``import numpy`` fails.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from kvckpt.dcp.tensor_bytes import byte_view, writable_byte_view
from tests.harness.servers import RedisServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Saves and loads through every byte-view path: whole tensors read straight into their target, a
#: non-contiguous target read through scratch memory, and a bool tensor (no numpy-style dtype needed).
WITHOUT_NUMPY = textwrap.dedent(
    """
    import sys
    sys.modules["numpy"] = None  # import numpy now raises ImportError, as where it is not installed
    import torch
    import kvckpt
    url = sys.argv[1]
    state = {
        "w": torch.arange(4096, dtype=torch.float32).reshape(64, 64),
        "b": torch.arange(7, dtype=torch.bfloat16),
        "mask": torch.arange(10) % 3 == 0,
    }
    kvckpt.save(state, url)
    loaded = {
        "w": torch.zeros(64, 64).t(),  # not contiguous: the values land in scratch memory first
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "mask": torch.zeros(10, dtype=torch.bool),
    }
    kvckpt.load(loaded, url)
    assert all(torch.equal(loaded[k], state[k]) for k in state), loaded
    assert "numpy" not in sys.modules or sys.modules["numpy"] is None
    print("round trip ok")
    """
)


def test_save_and_load_work_where_numpy_cannot_be_imported(redis_server: RedisServer, namespace: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_NUMPY, redis_server.url(namespace)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round trip ok" in done.stdout


def test_views_share_the_tensor_memory() -> None:
    tensor = torch.arange(6, dtype=torch.int16)
    view = byte_view(tensor)
    assert view.format == "B" and view.nbytes == 12 and view.readonly
    assert bytes(view[:4]) == (0).to_bytes(2, sys.byteorder) + (1).to_bytes(2, sys.byteorder)
    tensor[0] = 0x0102  # the view sees the change: no copy was made
    assert bytes(view[:2]) == (0x0102).to_bytes(2, sys.byteorder)


def test_writable_view_lands_in_the_tensor() -> None:
    tensor = torch.zeros(4, dtype=torch.float32)
    view = writable_byte_view(tensor)
    assert view is not None and not view.readonly
    view[:] = bytes(byte_view(torch.tensor([1.5, -2.0, 3.0, 0.25])))
    assert tensor.tolist() == [1.5, -2.0, 3.0, 0.25]


def test_a_view_keeps_its_tensor_alive() -> None:
    def make() -> tuple[weakref.ref[torch.Tensor], memoryview]:
        tensor = torch.full((1 << 16,), 7, dtype=torch.uint8)
        return weakref.ref(tensor), byte_view(tensor)

    alive, view = make()
    gc.collect()
    assert alive() is not None
    assert bytes(view[-3:]) == b"\x07\x07\x07"
    piece = view[10:20]  # a slice holds the memory too
    del view
    gc.collect()
    assert alive() is not None and bytes(piece) == b"\x07" * 10
    del piece
    gc.collect()
    assert alive() is None


def test_empty_tensors_give_empty_views() -> None:
    empty = torch.zeros(0, 3)
    assert byte_view(empty).nbytes == 0 and byte_view(empty).readonly
    writable = writable_byte_view(empty)
    assert writable is not None and writable.nbytes == 0 and not writable.readonly


def test_non_contiguous_or_unusual_tensors() -> None:
    grid = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        byte_view(grid.t())
    assert writable_byte_view(grid.t()) is None
    assert writable_byte_view(torch.zeros(2, dtype=torch.complex64).conj()) is None
    assert writable_byte_view(grid[1]) is not None  # a contiguous row inside a bigger storage
    row = writable_byte_view(grid[1])
    assert row is not None
    row[:4] = bytes(byte_view(torch.tensor([9.0])))
    assert grid[1, 0].item() == 9.0 and grid[0].sum().item() == 0 and grid[2].sum().item() == 0
