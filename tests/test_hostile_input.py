"""Damaged and hostile store content (docs/reliability.md).

Every kind of damage is a specific kvckpt error naming the key, never wrong data; a hostile length
field never sizes an allocation; a pickle placed in the store does not run under ``kvckpt.load``;
names with unicode, spaces, glob characters and ``/`` are taken literally.
"""

from __future__ import annotations

import io
import pathlib
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import torch

import kvckpt
from kvckpt import layout, record
from kvckpt.checksum import DEFAULT_BLOCK_BYTES, block_sums
from tests.conftest import Backend
from tests.helpers import bits_equal, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHUNK = 256 << 10


def ckpt(backend: Backend, namespace: str) -> str:
    """A checkpoint_id for any namespace text (Backend.id percent-encodes it inside URLs)."""
    return backend.id(namespace)


def sample() -> dict[str, Any]:
    return {
        "a": random_tensor((300, 1000), torch.float32, seed=1),  # 1.2 MB: five chunks
        "b": random_tensor((300, 1000), torch.float32, seed=2),
        "cfg": {"lr": 0.1, "name": "run"},
        "step": 7,
    }


def blank() -> dict[str, Any]:
    return {
        "a": torch.zeros(300, 1000),
        "b": torch.zeros(300, 1000),
        "cfg": {"lr": 0.0, "name": ""},
        "step": 0,
    }


def saved(backend: Backend, namespace: str) -> list[str]:
    """Save the sample, a key per item (tests/test_packing.py damages packs); return its data keys, sorted."""
    kvckpt.save(sample(), ckpt(backend, namespace), chunk_bytes=CHUNK, pack_below=0, **backend.options)
    return backend.keys(f"{namespace}/g")


def load_error(backend: Backend, namespace: str, **options: Any) -> kvckpt.CorruptCheckpointError:
    with pytest.raises(kvckpt.CorruptCheckpointError) as info:
        kvckpt.load(blank(), ckpt(backend, namespace), **backend.options, **options)
    return info.value


# Damaged chunks -------------------------------------------------------------------------------


def stored(backend: Backend, key: str) -> bytes:
    value = backend.store.get(key)
    assert value is not None, key
    return value


def test_flipped_byte_in_any_chunk_is_named(backend: Backend, namespace: str) -> None:
    keys = saved(backend, namespace)
    assert len(keys) == 13  # 2 tensors x 5 chunks + 3 objects (cfg.lr, cfg.name, step)
    for n, key in enumerate(keys):
        original = stored(backend, key)
        damaged = bytearray(original)
        damaged[(n * 7919) % len(damaged)] ^= 0x01
        backend.store.put(key, bytes(damaged))
        error = load_error(backend, namespace)
        assert error.key == key and "checksum mismatch" in str(error)
        backend.store.put(key, original)
    loaded = blank()
    kvckpt.load(loaded, ckpt(backend, namespace), **backend.options)
    assert bits_equal(loaded["a"], sample()["a"])


@pytest.mark.parametrize("kind", ["tensor", "object"])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_short_or_missing_chunk_is_named(backend: Backend, namespace: str, kind: str, damage: str) -> None:
    keys = saved(backend, namespace)
    key = next(k for k in keys if ("/a/0,0/" in k if kind == "tensor" else "/cfg.lr/bytes/" in k))
    if damage == "missing":
        backend.store.delete(key)
    else:
        backend.store.put(key, stored(backend, key)[:100])
    error = load_error(backend, namespace)
    assert error.key == key and "missing or truncated" in str(error)


def test_chunk_swapped_with_another_keys_value(backend: Backend, namespace: str) -> None:
    keys = saved(backend, namespace)
    first_a = next(k for k in keys if "/a/0,0/0" in k)
    first_b = next(k for k in keys if "/b/0,0/0" in k)
    value_a, value_b = stored(backend, first_a), stored(backend, first_b)
    assert len(value_a) == len(value_b)
    backend.store.put(first_a, value_b)
    backend.store.put(first_b, value_a)
    error = load_error(backend, namespace)
    assert error.key in (first_a, first_b) and "checksum mismatch" in str(error)


# Damaged or hostile records -------------------------------------------------------------------


def _item(body: dict[str, Any], fqn: str) -> list[Any]:
    return next(row for row in body["items"] if row[0] == fqn)


def _grow_object(body: dict[str, Any], by: int) -> None:
    row = _item(body, "cfg.lr")
    row[2] += by
    row[5][0][1] += by


def _set(fqn: str, field: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        _item(body, fqn)[field] = value

    return edit


RECORD_DAMAGE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # name: (edit of the decoded record, whose key the error must name: "record" or "data")
    "item-size-not-sum-of-chunks": (lambda b: _item(b, "a").__setitem__(2, 1), "record"),
    "shape-disagrees-with-size": (_set("a", 4, [150, 1000]), "record"),
    "box-outside-tensor": (_set("a", 1, [100, 0]), "record"),
    "dtype-disagrees-with-entry": (_set("a", 3, "float64"), "record"),
    "object-stored-as-tensor": (_set("step", 3, "uint8"), "record"),
    "negative-chunk-size": (lambda b: _item(b, "cfg.lr")[5][0].__setitem__(1, -5), "record"),
    "object-longer-than-stored": (lambda b: _grow_object(b, 10), "data"),
    "hostile-object-length": (lambda b: _grow_object(b, 1 << 40), "data"),
}


@pytest.mark.parametrize("damage", list(RECORD_DAMAGE))
def test_record_that_disagrees_with_the_data(backend: Backend, namespace: str, damage: str) -> None:
    keys = saved(backend, namespace)
    key = layout.record_key(namespace)
    body = record.decode_record(stored(backend, key), key)
    edit, named = RECORD_DAMAGE[damage]
    edit(body)
    backend.store.put(key, record.pack(body))
    tracemalloc.start()
    try:
        error = load_error(backend, namespace)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = key if named == "record" else next(k for k in keys if "/cfg.lr/" in k)
    assert error.key == expected, str(error)
    assert peak < 64 << 20  # a claimed 1 TiB object never sizes a buffer


# A pickle placed in the store -----------------------------------------------------------------


class _Touch:
    """Unpickling it touches a file: a stand-in for any code an attacker wants to run."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


def test_placed_pickle_does_not_run(backend: Backend, namespace: str, tmp_path: pathlib.Path) -> None:
    """An attacker with write access replaces an object and fixes up the record to match."""
    keys = saved(backend, namespace)
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_Touch(marker), payload)
    data = payload.getvalue()
    (target,) = [k for k in keys if "/cfg.name/bytes/" in k]
    backend.store.put(target, data)
    key = layout.record_key(namespace)
    body = record.decode_record(stored(backend, key), key)
    row = _item(body, "cfg.name")
    row[2] = row[5][0][1] = len(data)
    row[5][0][2] = block_sums(memoryview(data), DEFAULT_BLOCK_BYTES)
    backend.store.put(key, record.pack(body))

    with pytest.raises(kvckpt.KVCheckpointError, match="allow_pickle=True"):
        kvckpt.load(blank(), ckpt(backend, namespace), **backend.options)
    assert not marker.exists()
    kvckpt.load(blank(), ckpt(backend, namespace), allow_pickle=True, **backend.options)
    assert marker.exists()  # the opt-out is explicit, and does what it says


# Names taken literally ------------------------------------------------------------------------


def test_unicode_spaces_globs_and_slashes_are_literal(backend: Backend, namespace: str) -> None:
    root = f"{namespace}/ü 空 x*?[y]"
    state: dict[str, Any] = {
        "a/b": torch.full((3,), 1.0),
        "a": {"b": torch.full((3,), 2.0)},  # flattens to "a.b": a different fqn from "a/b"
        "sp ace/ü*": torch.full((3,), 3.0),
        "x/0,0/0": torch.full((3,), 4.0),  # looks like a key suffix
        ".metadata": torch.full((3,), 5.0),  # looks like the record's name
    }
    child = {"c": torch.full((2,), 9.0)}
    kvckpt.save(state, ckpt(backend, root), **backend.options)
    kvckpt.save(child, ckpt(backend, f"{root}/child"), **backend.options)
    kvckpt.save(child, ckpt(backend, f"{namespace}/ü 空 xA?[y]"), **backend.options)  # a glob's match
    loaded: dict[str, Any] = {k: (torch.zeros(3) if k != "a" else {"b": torch.zeros(3)}) for k in state}
    kvckpt.load(loaded, ckpt(backend, root), **backend.options)
    for fqn, value in state.items():
        got = loaded[fqn]["b"] if fqn == "a" else loaded[fqn]
        want = value["b"] if fqn == "a" else value
        assert bits_equal(want, got), fqn
    records = [k for k in backend.keys(root) if k.endswith(".metadata")]
    assert sorted(records) == [f"{root}/.metadata", f"{root}/child/.metadata"]

    assert kvckpt.delete(ckpt(backend, root), **backend.options)
    for survivor in (f"{root}/child", f"{namespace}/ü 空 xA?[y]"):
        out = {"c": torch.zeros(2)}
        kvckpt.load(out, ckpt(backend, survivor), **backend.options)
        assert bits_equal(out["c"], child["c"]), survivor
    left = set(backend.keys(f"{namespace}/"))
    assert not any(k.startswith(f"{root}/g") or k == f"{root}/.metadata" for k in left)
