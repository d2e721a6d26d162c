"""DCP round trips through KVStorageWriter/KVStorageReader on every backend, plus commit semantics."""

from __future__ import annotations

import pickle
import time
import warnings
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import kvckpt
from kvckpt import layout, record
from tests.conftest import Backend
from tests.helpers import ALL_DTYPES, bits_equal, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def reference_state() -> dict[str, Any]:
    base = random_tensor((64, 48), torch.float32, seed=1)
    state: dict[str, Any] = {
        f"dtype.{str(d)[6:]}": random_tensor((5, 7), d, seed=i) for i, d in enumerate(ALL_DTYPES)
    }
    state.update(
        {
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
            "empty": torch.empty(0, 16),
            "empty_int": torch.empty(4, 0, dtype=torch.int64),
            "transposed": base.t(),
            "strided": base[::3, 1::2],
            "narrowed": base[10:20],
            "conj": torch.randn(6, 3, dtype=torch.complex64).conj(),
            "large": random_tensor((700, 1024), torch.float32, seed=9),  # ~2.7 MiB: several chunks
            "model": {"layer.0": {"weight": random_tensor((32, 16), torch.bfloat16, seed=3)}},
            "step": 1234,
            "lr": 3e-4,
            "name": "run/ü*?[x]",
            "flags": [True, None, (1, 2)],
            "history": {"loss": [1.0, 0.5], "epoch": 3},
        }
    )
    return state


def zeros_like_state(state: dict[str, Any]) -> dict[str, Any]:
    def blank(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.zeros(value.shape, dtype=value.dtype)
        if isinstance(value, dict):
            return {k: blank(v) for k, v in value.items()}
        return None

    return {k: blank(v) for k, v in state.items()}


def assert_same(expected: Any, actual: Any, path: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        if expected.is_conj():
            expected = expected.resolve_conj()
        assert bits_equal(expected.contiguous(), actual), path
    elif isinstance(expected, dict):
        assert set(expected) == set(actual), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}.{key}")
    else:
        assert expected == actual, path


def failure_of(exc: CheckpointException) -> BaseException:
    first = next(iter(exc.failures.values()))
    return first[0] if isinstance(first, tuple) else first


def test_round_trip_every_item_kind(backend: Backend, namespace: str) -> None:
    state = reference_state()
    kvckpt.save(state, backend.id(namespace), chunk_bytes=1 << 20, **backend.options)
    loaded = zeros_like_state(state)
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert_same(state, loaded)


def test_plain_dcp_entry_points(backend: Backend, namespace: str) -> None:
    state = {"w": random_tensor((100, 10), torch.float16), "meta": {"epoch": 2}}
    writer = kvckpt.KVStorageWriter(backend.id(namespace), **backend.options)
    dcp.save(state, storage_writer=writer)
    loaded = {"w": torch.zeros(100, 10, dtype=torch.float16), "meta": {"epoch": 0}}
    dcp.load(loaded, storage_reader=kvckpt.KVStorageReader(backend.id(namespace), **backend.options))
    assert_same(state, loaded)


class WarnsWhenSaved:
    """A Stateful whose state_dict() warns inside dcp.save: a warning kvckpt must not swallow."""

    def state_dict(self) -> dict[str, Any]:
        warnings.warn("the caller's own warning", UserWarning, stacklevel=2)
        return {"v": torch.ones(3)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_save_and_load_without_a_process_group_do_not_warn_of_it(redis_server: Any, namespace: str) -> None:
    """The README says both work without one; torch's "assuming ... a single process" is noise there."""
    url = redis_server.url(namespace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kvckpt.save({"w": torch.ones(3), "obj": WarnsWhenSaved()}, url)
        kvckpt.save({"w": torch.ones(3)}, f"{url}-again", no_dist=True)
        loaded = {"w": torch.zeros(3)}
        kvckpt.load(loaded, url, planner=None)
        kvckpt.load(loaded, f"{url}-again", no_dist=True)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "single process" in m], messages
    assert messages.count("the caller's own warning") == 1  # every other warning still propagates
    assert torch.equal(loaded["w"], torch.ones(3))


def test_keys_are_readable_and_under_one_generation(backend: Backend, namespace: str) -> None:
    state = {"layer": {"w": torch.ones(4, 4)}, "step": 1}
    kvckpt.save(state, backend.id(namespace), pack_below=0, **backend.options)  # a key per item
    keys = backend.keys(f"{namespace}/")
    assert keys[0] == f"{namespace}/.metadata"
    generations = {k.split("/")[2] for k in keys[1:]}
    assert len(generations) == 1 and generations.pop().startswith("g")
    assert any(k.endswith("/layer.w/0,0/0") for k in keys)
    assert any(k.endswith("/step/bytes/0") for k in keys)


def test_chunks_respect_chunk_bytes(backend: Backend, namespace: str) -> None:
    tensor = random_tensor((1000, 250), torch.float32)  # 1,000,000 bytes
    kvckpt.save({"t": tensor}, backend.id(namespace), chunk_bytes=300_000, **backend.options)
    sizes = sorted(len(backend.store.get(k) or b"") for k in backend.keys(f"{namespace}/g"))
    assert sizes == [100_000, 300_000, 300_000, 300_000]
    loaded = {"t": torch.zeros(1000, 250)}
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert bits_equal(tensor, loaded["t"])


def test_record_round_trips_dcp_metadata_exactly(backend: Backend, namespace: str) -> None:
    state = reference_state()
    written = kvckpt.save(state, backend.id(namespace), **backend.options)
    reader = kvckpt.KVStorageReader(backend.id(namespace), **backend.options)
    read = reader.read_metadata()
    assert read.state_dict_metadata == written.state_dict_metadata
    assert read.planner_data == written.planner_data
    for fqn, path in written.planner_data.items():
        assert type(read.planner_data[fqn]) is type(path) is tuple
    assert read.version == written.version
    assert read.storage_meta == written.storage_meta
    assert read.storage_data == written.storage_data
    assert reader.read_metadata() is read  # decoded once per reader


def test_reset_switches_namespace(backend: Backend, namespace: str) -> None:
    writer = kvckpt.KVStorageWriter(**backend.options)
    for step in (1, 2):
        dcp.save(
            {"x": torch.full((3,), float(step))},
            storage_writer=writer,
            checkpoint_id=backend.id(f"{namespace}/{step}"),
        )
    reader = kvckpt.KVStorageReader(**backend.options)
    for step in (1, 2):
        loaded = {"x": torch.zeros(3)}
        dcp.load(loaded, storage_reader=reader, checkpoint_id=backend.id(f"{namespace}/{step}"))
        assert torch.equal(loaded["x"], torch.full((3,), float(step)))


def test_overwrite_refused_before_any_data_is_written(backend: Backend, namespace: str) -> None:
    kvckpt.save({"x": torch.ones(3)}, backend.id(namespace), **backend.options)
    before = backend.keys(f"{namespace}/")
    with pytest.raises(kvckpt.CheckpointExistsError, match="overwrite=True"):
        kvckpt.save({"x": torch.zeros(3), "y": torch.zeros(5)}, backend.id(namespace), **backend.options)
    assert backend.keys(f"{namespace}/") == before
    loaded = {"x": torch.zeros(3)}
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert torch.equal(loaded["x"], torch.ones(3))


def test_refusal_keeps_dcps_words_for_code_that_matches_them(backend: Backend, namespace: str) -> None:
    """FileSystemWriter says "Checkpoint already exists"; callers match on it, so kvckpt says it too."""
    kvckpt.save({"x": torch.ones(3)}, backend.id(namespace), **backend.options)
    with pytest.raises(kvckpt.CheckpointExistsError, match=r"^Checkpoint already exists"):
        kvckpt.save({"x": torch.ones(3)}, backend.id(namespace), **backend.options)


def test_overwrite_replaces_and_removes_old_generation(backend: Backend, namespace: str) -> None:
    kvckpt.save({"x": torch.ones(3), "old": torch.ones(2)}, backend.id(namespace), **backend.options)
    kvckpt.save({"x": torch.full((3,), 2.0)}, backend.id(namespace), overwrite=True, **backend.options)
    keys = backend.keys(f"{namespace}/")
    assert len({k.split("/")[2] for k in keys if not k.endswith(".metadata")}) == 1
    assert not any("/old/" in k for k in keys)
    loaded = {"x": torch.zeros(3)}
    kvckpt.load(loaded, backend.id(namespace), **backend.options)
    assert torch.equal(loaded["x"], torch.full((3,), 2.0))


class ExplodingPlanner(DefaultSavePlanner):
    """Fails after a few items have been written, like a device error mid-save."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def resolve_data(self, write_item: Any) -> Any:
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("injected failure")
        return super().resolve_data(write_item)


def test_failed_save_keeps_previous_and_leaves_nothing(backend: Backend, namespace: str) -> None:
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(20)}
    kvckpt.save(state, backend.id(f"{namespace}/kept"), **backend.options)
    for target, overwrite in ((f"{namespace}/kept", True), (f"{namespace}/fresh", False)):
        writer = kvckpt.KVStorageWriter(
            backend.id(target), overwrite=overwrite, chunk_bytes=1000, **backend.options
        )
        with pytest.raises(CheckpointException) as info:
            dcp.save(
                {k: v + 100 for k, v in state.items()}, storage_writer=writer, planner=ExplodingPlanner(7)
            )
        assert "injected failure" in str(failure_of(info.value))
    assert backend.keys(f"{namespace}/fresh") == []
    kept = backend.keys(f"{namespace}/kept/")
    assert len({k.split("/")[3] for k in kept if not k.endswith(".metadata")}) == 1
    loaded = {k: torch.zeros(1000) for k in state}
    kvckpt.load(loaded, backend.id(f"{namespace}/kept"), **backend.options)
    assert_same(state, loaded)
    with pytest.raises(kvckpt.CheckpointNotFoundError):
        kvckpt.load({"t0": torch.zeros(1000)}, backend.id(f"{namespace}/fresh"), **backend.options)


def test_committed_data_is_permanent_and_ttl_covers_every_key(redis_backend: Backend, namespace: str) -> None:
    backend, client = redis_backend, redis_backend.raw
    kvckpt.save({"x": torch.ones(10)}, backend.id(f"{namespace}/keep"), **backend.options)
    assert all(client.pttl(k) == -1 for k in backend.keys(f"{namespace}/keep/"))
    kvckpt.save({"x": torch.ones(10)}, backend.id(f"{namespace}/short"), ttl=30, **backend.options)
    ttls = {k: client.pttl(k) for k in backend.keys(f"{namespace}/short/")}
    record_ttl = ttls.pop(f"{namespace}/short/.metadata")
    assert 0 < record_ttl <= 30_000
    assert ttls and all(record_ttl < t <= 30_000 + 60_000 for t in ttls.values())


def test_ttl_expires_the_checkpoint(backend: Backend, namespace: str) -> None:
    kvckpt.save({"x": torch.ones(10)}, backend.id(namespace), ttl=1, **backend.options)
    kvckpt.load({"x": torch.zeros(10)}, backend.id(namespace), **backend.options)
    deadline = time.monotonic() + 8
    while backend.store.exists(layout.record_key(namespace)):
        assert time.monotonic() < deadline, "the record did not expire"
        time.sleep(0.2)
    with pytest.raises(kvckpt.CheckpointNotFoundError):
        kvckpt.load({"x": torch.zeros(10)}, backend.id(namespace), **backend.options)


def test_flipped_byte_is_detected(backend: Backend, namespace: str) -> None:
    kvckpt.save({"w": torch.arange(4096, dtype=torch.float32)}, backend.id(namespace), **backend.options)
    (key,) = backend.keys(f"{namespace}/g")
    value = bytearray(backend.store.get(key) or b"")
    value[1234] ^= 0x10
    backend.store.put(key, bytes(value))
    with pytest.raises(kvckpt.CorruptCheckpointError, match="checksum mismatch") as info:
        kvckpt.load({"w": torch.zeros(4096)}, backend.id(namespace), **backend.options)
    assert info.value.key == key and info.value.fqn == "w"
    assert namespace in str(info.value)


def test_deleted_chunk_is_detected(backend: Backend, namespace: str) -> None:
    kvckpt.save({"w": torch.ones(100_000)}, backend.id(namespace), chunk_bytes=100_000, **backend.options)
    victim = backend.keys(f"{namespace}/g")[1]
    backend.store.delete(victim)
    with pytest.raises(kvckpt.CorruptCheckpointError, match="missing or truncated") as info:
        kvckpt.load({"w": torch.zeros(100_000)}, backend.id(namespace), **backend.options)
    assert info.value.key == victim


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"\xc1garbage",
        lambda raw: raw[: len(raw) // 2],
        lambda raw: record.pack({"format": "kvckpt", "version": 99}),
        lambda raw: record.pack({"format": "kvckpt", "version": 1, "items": "nope"}),
        lambda raw: record.pack([1, 2, 3]),
    ],
    ids=["garbage", "truncated", "unknown-version", "malformed", "not-a-map"],
)
def test_bad_record_is_a_clear_error(backend: Backend, namespace: str, damage: Any) -> None:
    kvckpt.save({"w": torch.ones(3)}, backend.id(namespace), **backend.options)
    key = layout.record_key(namespace)
    backend.store.put(key, damage(backend.store.get(key)))
    with pytest.raises(kvckpt.CorruptCheckpointError) as info:
        kvckpt.load({"w": torch.zeros(3)}, backend.id(namespace), **backend.options)
    assert info.value.key == key


def test_missing_checkpoint(backend: Backend, namespace: str) -> None:
    with pytest.raises(kvckpt.CheckpointNotFoundError, match="no committed checkpoint"):
        kvckpt.load({"w": torch.zeros(3)}, backend.id(namespace), **backend.options)


def test_glob_characters_in_namespace_are_literal(backend: Backend, namespace: str) -> None:
    tricky, sibling = f"{namespace}/a*b?[c]\\d é", f"{namespace}/aXb?[c]\\d é"
    kvckpt.save({"x": torch.ones(2)}, backend.id(tricky), **backend.options)
    kvckpt.save({"x": torch.full((2,), 7.0)}, backend.id(sibling), **backend.options)
    records = [k for k in backend.keys(f"{namespace}/") if k.endswith("/.metadata")]
    assert records == sorted([f"{tricky}/.metadata", f"{sibling}/.metadata"])
    assert kvckpt.delete(backend.id(tricky), **backend.options) is True
    assert kvckpt.delete(backend.id(tricky), **backend.options) is False
    loaded = {"x": torch.zeros(2)}
    kvckpt.load(loaded, backend.id(sibling), **backend.options)
    assert torch.equal(loaded["x"], torch.full((2,), 7.0))
    assert backend.keys(f"{namespace}/a*b") == []


def test_unsafe_pickle_in_byte_item_is_refused(backend: Backend, namespace: str) -> None:
    kvckpt.save({"obj": Unsafe()}, backend.id(namespace), **backend.options)
    Unsafe.loaded = False
    with pytest.raises(kvckpt.KVCheckpointError, match="allow_pickle=True"):
        kvckpt.load({"obj": None}, backend.id(namespace), **backend.options)
    assert Unsafe.loaded is False
    state: dict[str, Any] = {"obj": None}
    kvckpt.load(state, backend.id(namespace), allow_pickle=True, **backend.options)
    assert isinstance(state["obj"], Unsafe) and Unsafe.loaded is True


class Unsafe:
    """Stands for a hostile object: unpickling it calls a function of the attacker's choosing."""

    loaded = False

    def __reduce__(self) -> Any:
        return (_run_on_unpickle, ())


def _run_on_unpickle() -> Unsafe:
    Unsafe.loaded = True
    return Unsafe()


def test_unknown_dtype_in_record_is_refused(backend: Backend, namespace: str) -> None:
    kvckpt.save({"w": torch.ones(3)}, backend.id(namespace), **backend.options)
    key = layout.record_key(namespace)
    body = record.decode_record(backend.store.get(key) or b"", key)
    body["state_dict"][0][1]["dtype"] = "os.system"
    backend.store.put(key, record.pack(body))
    with pytest.raises(kvckpt.CorruptCheckpointError, match="unknown dtype"):
        kvckpt.load({"w": torch.zeros(3)}, backend.id(namespace), **backend.options)


def test_writer_and_reader_pickle(redis_server: Any, namespace: str) -> None:
    url = redis_server.url(namespace)
    writer = pickle.loads(pickle.dumps(kvckpt.KVStorageWriter(url)))
    dcp.save({"x": torch.arange(5)}, storage_writer=writer)
    reader = pickle.loads(pickle.dumps(kvckpt.KVStorageReader(url)))
    loaded = {"x": torch.zeros(5, dtype=torch.int64)}
    dcp.load(loaded, storage_reader=reader)
    assert torch.equal(loaded["x"], torch.arange(5))


def test_validate_checkpoint_id() -> None:
    owned = [
        "redis://h:1/0/ns",
        "rediss://h/0/ns",
        "redis+unix:///s.sock?namespace=n",
        "redis+cluster://a:1/n",
        "etcd://a:2379/n",
    ]
    for url in owned:
        assert kvckpt.KVStorageWriter.validate_checkpoint_id(url)
        assert kvckpt.KVStorageReader.validate_checkpoint_id(url)
    for other in ["/tmp/ckpt", "s3://bucket/x", "file:///tmp/x", "ns", "http://h/0/ns"]:
        assert not kvckpt.KVStorageWriter.validate_checkpoint_id(other)


def test_dead_server_fails_fast(namespace: str) -> None:
    from tests.harness.servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0/{namespace}"
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError, match="cannot reach"):
        kvckpt.save({"x": torch.ones(2)}, url)
    with pytest.raises(kvckpt.StoreUnavailableError):
        kvckpt.load({"x": torch.ones(2)}, url)
    assert time.monotonic() - started < 10


def test_errors_pickle_with_context() -> None:
    error = kvckpt.CorruptCheckpointError("bad", key="k", fqn="f")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is kvckpt.CorruptCheckpointError
    assert (str(clone), clone.key, clone.fqn) == ("bad", "k", "f")


def test_codec_round_trips_every_metadata_field() -> None:
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    from kvckpt.dcp.codec import decode_metadata, encode_metadata
    from kvckpt.layout import StoredChunk, StoredItem

    props = TensorProperties(torch.float8_e5m2, torch.strided, True, torch.channels_last, True)
    chunks = [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
        ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 3])),
    ]
    items = {
        MetadataIndex("w", [0, 0]): StoredItem(
            6, (StoredChunk("g/w/0,0/0", 6, (1, 2**64 - 1)),), "float8_e5m2", (2, 3)
        ),
        MetadataIndex("w", [2, 0]): StoredItem(0, (), "float8_e5m2", (0, 3)),
        MetadataIndex("b"): StoredItem(3, (StoredChunk("g/b/bytes/0", 3, ()),)),
    }
    metadata = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(props, torch.Size([4, 3]), chunks),
            "b": BytesStorageMetadata(),
        },
        planner_data={"w": ("model", "w"), "b": ("b", 0, ("nested", None))},
        storage_data=items,
        storage_meta=StorageMeta(checkpoint_id="redis://h:1/0/x", save_id="s", load_id="l", modules=["m"]),
        version="1.0.0",
    )
    data = record.encode_record(encode_metadata(metadata, items))
    decoded = decode_metadata(record.decode_record(data, "k"), "k")
    assert decoded == metadata
    assert decoded.planner_data["b"][2] == ("nested", None)


def test_missing_checkpoint_id_says_where_to_pass_it() -> None:
    for adapter in (kvckpt.KVStorageWriter(), kvckpt.KVStorageReader()):
        assert adapter.checkpoint_id is None
        with pytest.raises(kvckpt.KVCheckpointError, match=f"pass one to {type(adapter).__name__}"):
            _ = adapter.target


def test_a_reused_writer_and_reader_never_reuse_a_generation(backend: Backend, namespace: str) -> None:
    """dcp.save without checkpoint_id does not call reset(): each save must still get a new generation."""
    writer = kvckpt.KVStorageWriter(backend.id(namespace), overwrite=True, **backend.options)
    reader = kvckpt.KVStorageReader(backend.id(namespace), **backend.options)
    dcp.save({"w": torch.ones(4)}, storage_writer=writer, no_dist=True)
    first = backend.keys(f"{namespace}/g")
    loaded = {"w": torch.zeros(4)}
    dcp.load(loaded, storage_reader=reader, no_dist=True)
    with pytest.raises(CheckpointException):
        dcp.save({"w": torch.ones(4), "x": Unsafe()}, storage_writer=writer, planner=ExplodingPlanner(1))
    assert backend.keys(f"{namespace}/g") == first  # the failed save touched nothing committed
    dcp.save({"w": torch.full((4,), 2.0)}, storage_writer=writer, no_dist=True)
    second = backend.keys(f"{namespace}/g")
    assert second and not set(second) & set(first)
    dcp.load(loaded, storage_reader=reader, no_dist=True)  # the reader sees the new record, not a cached one
    assert torch.equal(loaded["w"], torch.full((4,), 2.0))
