"""Small items share values (packs): few keys, bit-for-bit loads, per-item checks (docs/record-format.md)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
import redis
import torch

import kvckpt
from kvckpt import layout, record
from kvckpt.registry import open_store
from tests.conftest import Backend
from tests.harness.cluster import RedisCluster
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = 1000  # tensors of 4 KiB: 4 MB in all, one pack of the default 4 MiB chunk size on Redis


def small_state() -> dict[str, Any]:
    state: dict[str, Any] = {f"t.{n}": random_tensor((1024,), torch.float32, seed=n) for n in range(SMALL)}
    state.update({"step": 7, "cfg": {"lr": 0.1, "name": "run"}, "scalar": torch.tensor(2.5)})
    return state


def blank(state: dict[str, Any]) -> dict[str, Any]:
    def zero(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.zeros_like(value)
        return {k: zero(v) for k, v in value.items()} if isinstance(value, dict) else None

    return {k: zero(v) for k, v in state.items()}


def assert_same(expected: Any, actual: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert bits_equal(expected, actual)
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys()
        for key in expected:
            assert_same(expected[key], actual[key])
    else:
        assert expected == actual


def body_of(backend: Backend, namespace: str) -> dict[str, Any]:
    key = layout.record_key(namespace)
    return record.decode_record(backend.store.get(key) or b"", key)


def chunk_of(body: dict[str, Any], fqn: str) -> list[Any]:
    (row,) = [row for row in body["items"] if row[0] == fqn]
    (chunk,) = row[5]
    return list(chunk)


def test_small_items_share_few_keys_and_load_bit_for_bit(backend: Backend, namespace: str) -> None:
    state = small_state()
    kvckpt.save(state, backend.id(namespace), **backend.options)
    keys = backend.keys(f"{namespace}/g")
    assert 1 <= len(keys) <= 4, keys  # 1,004 items (etcd's smaller values need three packs)
    assert all(k.split("/")[-2] == layout.PACK_NAME for k in keys)
    body = body_of(backend, namespace)
    assert body["version"] == 2 and body["num_keys"] == len(keys)
    loaded = blank(state)
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert_same(state, loaded)


def test_packs_on_a_cluster_load_bit_for_bit(redis_cluster: RedisCluster, namespace: str) -> None:
    state = small_state()
    kvckpt.save(state, redis_cluster.url(namespace), chunk_bytes=256 << 10)
    keys = record.chunk_keys(cluster_body(redis_cluster, namespace))
    assert len(keys) == 16  # 4,000,000+ bytes in packs of at most 256 KiB, never an item split
    loaded = blank(state)
    kvckpt.load(loaded, redis_cluster.url(namespace))
    assert_same(state, loaded)
    assert kvckpt.verify(redis_cluster.url(namespace)).num_keys == 16


def cluster_body(cluster: RedisCluster, namespace: str) -> dict[str, Any]:
    key = layout.record_key(namespace)
    with open_store(cluster.url("inspect")) as store:
        return record.decode_record(store.get(key) or b"", key)


def test_a_pack_never_splits_an_item_nor_outgrows_chunk_bytes(backend: Backend, namespace: str) -> None:
    state = {f"t{n}": random_tensor((750,), torch.float32, seed=n) for n in range(100)}  # 3,000 bytes each
    kvckpt.save(state, backend.id(namespace), chunk_bytes=10_000, **backend.options)
    sizes = [len(backend.store.get(k) or b"") for k in backend.keys(f"{namespace}/g")]
    assert sorted(sizes) == [3_000] + [9_000] * 33  # three items a pack
    loaded = blank(state)
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert_same(state, loaded)


def test_mixed_small_and_large_items(backend: Backend, namespace: str) -> None:
    state = small_state()
    state["large"] = random_tensor((700, 1024), torch.float32, seed=9)  # 2.7 MiB: its own chunks
    state["medium"] = random_tensor((64, 1024), torch.bfloat16, seed=10)  # 128 KiB: above pack_below
    kvckpt.save(state, backend.id(namespace), chunk_bytes=1 << 20, **backend.options)
    keys = backend.keys(f"{namespace}/g")
    own = [k for k in keys if k.split("/")[-2] != layout.PACK_NAME]
    assert sorted(k.split("/")[-3] for k in own) == ["large"] * 3 + ["medium"]
    assert len(keys) - len(own) == 4  # the small items, in packs of up to 1 MiB
    loaded = blank(state)
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert_same(state, loaded)
    # A load of a part reads only its items, from the middle of a pack.
    part = {"t.500": torch.zeros(1024), "large": torch.zeros(700, 1024)}
    kvckpt.load(part, backend.id(namespace), **backend.options)
    assert bits_equal(part["t.500"], state["t.500"]) and bits_equal(part["large"], state["large"])


def test_pack_below_zero_writes_the_version_1_record_of_before(backend: Backend, namespace: str) -> None:
    """Without packs a record is what older kvckpt wrote and reads: version 1, no chunk offsets."""
    state = {"a": torch.ones(3), "b": torch.arange(5), "step": 3}
    kvckpt.save(state, backend.id(namespace), pack_below=0, **backend.options)
    body = body_of(backend, namespace)
    assert body["version"] == 1
    assert all(len(chunk) == 3 for row in body["items"] for chunk in row[5])
    assert len(backend.keys(f"{namespace}/g")) == 3
    loaded = blank(state)
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert_same(state, loaded)


def test_a_load_reads_a_whole_pack_in_few_requests(redis_server: RedisServer, namespace: str) -> None:
    raw = redis.Redis(port=redis_server.port)
    state = small_state()
    kvckpt.save(state, redis_server.url(namespace))
    raw.config_resetstat()
    loaded = blank(state)
    kvckpt.load(loaded, redis_server.url(namespace))
    stats = raw.info("commandstats")
    reads = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("get", "getrange", "mget"))
    assert reads <= 8, stats  # the record, the objects, the pack in a few ranges: not 1,004 values
    assert_same(state, loaded)
    raw.close()


def test_verify_and_load_name_the_damaged_item_inside_a_pack(backend: Backend, namespace: str) -> None:
    state = small_state()
    kvckpt.save(state, backend.id(namespace), **backend.options)
    key, nbytes, _, offset = chunk_of(body_of(backend, namespace), "t.500")
    full = layout.full_key(namespace, key)
    value = bytearray(backend.store.get(full) or b"")
    value[offset + nbytes // 2] ^= 0x10
    backend.store.put(full, value)

    with pytest.raises(kvckpt.CorruptCheckpointError) as verified:
        kvckpt.verify(backend.id(namespace), **backend.options)
    assert verified.value.problems == [f"'t.500', key {full!r}: checksum mismatch in block 0"]
    with pytest.raises(kvckpt.CorruptCheckpointError) as loading:
        kvckpt.load(blank(state), backend.id(namespace), **backend.options)
    assert loading.value.fqn == "t.500" and loading.value.key == full
    # Its neighbours in the pack are intact, and load on their own.
    part = {"t.499": torch.zeros(1024), "t.501": torch.zeros(1024)}
    kvckpt.load(part, backend.id(namespace), **backend.options)
    assert bits_equal(part["t.501"], state["t.501"])


def test_delete_and_gc_treat_packs_as_the_checkpoint_s_data(backend: Backend, namespace: str) -> None:
    kvckpt.save(small_state(), backend.id(namespace), **backend.options)
    if backend.name != "fakeredis":  # gc needs a conditional commit
        assert kvckpt.gc(backend.id(namespace), **backend.options) == []
    kvckpt.load(blank(small_state()), backend.id(namespace), **backend.options)
    assert kvckpt.delete(backend.id(namespace), **backend.options)
    assert backend.keys(f"{namespace}/") == []


# Hostile offsets ------------------------------------------------------------------------------


def _move(fqn: str, where: Any) -> Any:
    """An edit of the record putting ``fqn``'s chunk at ``where(pack length, chunk)``."""

    def edit(body: dict[str, Any], length: int) -> None:
        (row,) = [row for row in body["items"] if row[0] == fqn]
        chunk = row[5][0]
        offset = where(length, chunk)
        chunk[3:] = [offset]

    return edit


HOSTILE = {
    "past-the-end": (_move("t.3", lambda n, c: n), "missing or truncated"),
    "straddling-the-end": (_move("t.3", lambda n, c: n - c[1] + 1), "missing or truncated"),
    "far-past-the-end": (_move("t.3", lambda n, c: 1 << 62), "missing or truncated"),
    "object-past-the-end": (_move("cfg.lr", lambda n, c: n - 1), "missing or truncated"),
    "negative": (_move("t.3", lambda n, c: -1), "'t.3'.*bad offset -1"),
    "beyond-64-bits": (_move("t.3", lambda n, c: 1 << 63), "'t.3'.*bad offset"),
}


@pytest.mark.parametrize("damage", list(HOSTILE))
def test_a_hostile_offset_is_a_named_error(backend: Backend, namespace: str, damage: str) -> None:
    state: dict[str, Any] = {f"t.{n}": random_tensor((1024,), torch.float32, seed=n) for n in range(8)}
    state["cfg"] = {"lr": 0.5}
    kvckpt.save(state, backend.id(namespace), **backend.options)
    (pack,) = backend.keys(f"{namespace}/g")
    key = layout.record_key(namespace)
    body = body_of(backend, namespace)
    edit, says = HOSTILE[damage]
    edit(body, len(backend.store.get(pack) or b""))
    backend.store.put(key, record.pack(body))
    tracemalloc.start()
    try:
        with pytest.raises(kvckpt.CorruptCheckpointError, match=says) as info:
            kvckpt.load(blank(state), backend.id(namespace), **backend.options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # an offset never sizes a buffer
    if says.startswith("missing"):
        assert info.value.key == pack and info.value.fqn in ("t.3", "cfg.lr")
    with pytest.raises(kvckpt.CorruptCheckpointError):
        kvckpt.verify(backend.id(namespace), **backend.options)
