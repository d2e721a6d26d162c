"""Checkpoint management against a real redis-server: list, latest, info, verify, delete, keep_last, copy."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
import redis
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import kvckpt
from kvckpt import layout, record
from tests.harness.servers import EtcdServer, RedisServer
from tests.helpers import bits_equal, random_tensor
from tests.test_dcp_core import assert_same, reference_state, zeros_like_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PASSWORD = "s3cret-pw"


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--requirepass", PASSWORD]) as server:
        yield server


def small_state(value: float = 1.0) -> dict[str, Any]:
    return {"w": torch.full((64, 8), value), "b": torch.arange(5), "step": int(value)}


def folder_state() -> dict[str, Any]:
    """reference_state() with a valid bool tensor: DCP's FileSystemReader copies through copy_(), which
    canonicalises the random non-0/1 bytes the core tests store in a bool tensor."""
    state = reference_state()
    state["dtype.bool"] = torch.randint(0, 2, (5, 7), generator=torch.Generator().manual_seed(5)).bool()
    return state


def keys_under(raw: redis.Redis, namespace: str) -> set[str]:
    return {k.decode() for k in raw.scan_iter(match=f"{namespace}/*", count=1000)}


# Listing ---------------------------------------------------------------------------------------


def test_list_shows_committed_and_rank_local_checkpoints_under_the_prefix(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    url = redis_server.url
    for step in (1, 2, 3):
        kvckpt.save(small_state(step), url(f"{namespace}/run1/step{step}"))
    kvckpt.save(small_state(), url(f"{namespace}/run1/step9"), ttl=600)
    kvckpt.save(small_state(), url(f"{namespace}/run10/step1"))  # a sibling run, not under run1
    raw.set(f"{namespace}/run1/step4/g20260101T000000-0badcafe/w/0,0/0", b"x")  # a save that died
    dcp.save(  # rank-local records only (use_collectives=False): listed, as one checkpoint
        small_state(),
        storage_writer=kvckpt.KVStorageWriter(url(f"{namespace}/run1/local")),
        use_collectives=False,
    )

    infos = kvckpt.list_checkpoints(url(f"{namespace}/run1"))

    assert [i.namespace for i in infos] == [
        f"{namespace}/run1/{s}" for s in ("step1", "step2", "step3", "step9", "local")
    ]
    assert [i.rank_local for i in infos] == [False] * 4 + [True]
    first = infos[0]
    assert first.checkpoint_id == url(f"{namespace}/run1/step1")
    assert (first.num_tensors, first.world_size, first.expires_at) == (2, 1, None)
    assert first.total_bytes > 64 * 8 * 4 + 5 * 8  # the tensors plus the pickled int
    assert first.num_keys == 1 and first.save_id.startswith("g")  # its three items share a pack
    assert abs(first.created - time.time()) < 60
    assert infos[-2].expires_at is not None and 500 < infos[-2].expires_at - time.time() <= 600
    assert [i.created for i in infos] == sorted(i.created for i in infos)
    assert kvckpt.latest(url(f"{namespace}/run1")) == url(f"{namespace}/run1/local")


def test_prefix_that_is_itself_a_checkpoint_and_glob_characters(
    redis_server: RedisServer, namespace: str
) -> None:
    def url(ns: str) -> str:
        return redis_server.url(quote(ns, safe="/"))  # '?' would start the URL's query otherwise

    tricky = f"{namespace}/a*b?[c]\\"
    kvckpt.save(small_state(), url(tricky))
    kvckpt.save(small_state(), url(f"{tricky}/child"))
    kvckpt.save(small_state(), url(f"{namespace}/aXb?[c]\\/other"))
    listed = kvckpt.list_checkpoints(url(tricky))
    assert sorted(i.namespace for i in listed) == [tricky, f"{tricky}/child"]
    assert sorted(i.checkpoint_id for i in listed) == [url(tricky), url(f"{tricky}/child")]


def test_empty_prefix(redis_server: RedisServer, namespace: str) -> None:
    assert kvckpt.list_checkpoints(redis_server.url(namespace)) == []
    assert kvckpt.latest(redis_server.url(namespace)) is None


def test_damaged_record_is_skipped_not_fatal(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    kvckpt.save(small_state(), redis_server.url(f"{namespace}/good"))
    kvckpt.save(small_state(), redis_server.url(f"{namespace}/bad"))
    raw.set(layout.record_key(f"{namespace}/bad"), b"\xc1 not msgpack")
    assert [i.namespace for i in kvckpt.list_checkpoints(redis_server.url(namespace))] == [
        f"{namespace}/good"
    ]


def test_listed_ids_are_usable_and_display_ids_redacted(auth_server: RedisServer, namespace: str) -> None:
    prefix = f"redis://:{PASSWORD}@127.0.0.1:{auth_server.port}/0/{namespace}"
    kvckpt.save(small_state(7), f"{prefix}/step7")
    (found,) = kvckpt.list_checkpoints(prefix)
    assert PASSWORD not in repr(found) and PASSWORD not in json.dumps(found.to_dict())
    assert ":***@" in found.display_id and found.to_dict()["checkpoint_id"] == found.display_id
    assert found.checkpoint_id == f"{prefix}/step7"  # the caller's own credentials, usable again
    assert kvckpt.verify(found.checkpoint_id).num_keys == 1  # small_state is one pack
    assert kvckpt.info(found.checkpoint_id).total_bytes == found.total_bytes
    latest = kvckpt.latest(prefix)
    assert latest == f"{prefix}/step7"
    state = small_state(0)
    kvckpt.load(state, latest)
    assert state["step"] == 7


def test_client_injection_uses_bare_namespaces(namespace: str) -> None:
    import fakeredis

    client = fakeredis.FakeRedis()
    kvckpt.save(small_state(), f"{namespace}/s1", client=client)
    assert [i.checkpoint_id for i in kvckpt.list_checkpoints(namespace, client=client)] == [f"{namespace}/s1"]
    assert kvckpt.latest(namespace, client=client) == f"{namespace}/s1"
    assert kvckpt.delete(f"{namespace}/s1", client=client) is True
    assert client.dbsize() == 0


# Info and verify -------------------------------------------------------------------------------


def test_info_sums_each_entry(redis_server: RedisServer, namespace: str) -> None:
    state = {"model": {"w": torch.ones(1000, 10, dtype=torch.bfloat16)}, "epoch": 3, "s": torch.tensor(1.0)}
    kvckpt.save(state, redis_server.url(namespace), chunk_bytes=8000)
    found = kvckpt.info(redis_server.url(namespace))
    entries = {e.fqn: e for e in found.entries}
    assert set(entries) == {"model.w", "epoch", "s"}
    w = entries["model.w"]
    assert (w.kind, w.dtype, w.shape, w.chunks, w.nbytes) == ("tensor", "bfloat16", (1000, 10), 3, 20000)
    assert (entries["s"].shape, entries["s"].nbytes) == ((), 4)
    assert entries["epoch"].kind == "bytes" and entries["epoch"].dtype is None
    assert sum(e.nbytes for e in found.entries) == found.total_bytes
    assert sum(e.chunks for e in found.entries) == 5
    assert found.num_keys == 4  # "epoch" and "s" share a pack


def test_info_and_verify_of_a_missing_checkpoint(redis_server: RedisServer, namespace: str) -> None:
    for call in (kvckpt.info, kvckpt.verify):
        with pytest.raises(kvckpt.CheckpointNotFoundError, match="kvckpt ls"):
            call(redis_server.url(namespace))


def test_verify_reports_every_damaged_chunk(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    url = redis_server.url(namespace)
    kvckpt.save({"w": random_tensor((4, 65536), torch.float32)}, url, chunk_bytes=200_000)
    checked: list[int] = []
    result = kvckpt.verify(url, progress=checked.append)
    assert (result.num_keys, result.nbytes, result.checksums) == (6, 4 * 65536 * 4, True)
    assert sum(checked) == result.nbytes

    keys = sorted(k for k in keys_under(raw, namespace) if not k.endswith(".metadata"))
    flipped = bytearray(cast(bytes, raw.get(keys[0])))
    flipped[150_000] ^= 1
    raw.set(keys[0], bytes(flipped))
    raw.delete(keys[1])
    raw.append(keys[2], b"extra")
    with pytest.raises(kvckpt.CorruptCheckpointError, match="3 of 6 chunks") as info:
        kvckpt.verify(url)
    problems = sorted(info.value.problems)
    assert len(problems) == 3
    assert any(keys[0] in p and "checksum mismatch in block 0" in p for p in problems)
    assert any(keys[1] in p and p.endswith("missing") for p in problems)
    assert any(keys[2] in p and "200005 bytes" in p for p in problems)


def test_verify_without_checksums_still_checks_sizes(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    url = redis_server.url(namespace)
    kvckpt.save({"w": torch.ones(100)}, url, checksums=False)
    assert kvckpt.verify(url).checksums is False
    (key,) = [k for k in keys_under(raw, namespace) if not k.endswith(".metadata")]
    raw.set(key, b"short")
    with pytest.raises(kvckpt.CorruptCheckpointError, match="5 bytes, the record says 400"):
        kvckpt.verify(url)


# Delete and keep_last --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counted_server() -> Iterator[RedisServer]:
    """A server of its own, so its command statistics count only this module's deletes."""
    with RedisServer() as server:
        yield server


def test_keep_last_and_delete_scale_without_blocking_commands(counted_server: RedisServer) -> None:
    raw = redis.Redis(port=counted_server.port)
    url = counted_server.url
    big = torch.arange(12_000, dtype=torch.float32)
    kvckpt.save({"w": big}, url("run/step1"), chunk_bytes=4)  # 12,000 data keys
    for step in (2, 3, 4):
        kvckpt.save(small_state(step), url(f"run/step{step}"))
    assert raw.dbsize() == 12_001 + 3 * 2  # a record and a pack each
    raw.config_resetstat()

    planned = kvckpt.keep_last(url("run"), 2, dry_run=True)
    assert [i.namespace for i in planned] == ["run/step1", "run/step2"] and raw.dbsize() == 12_007
    removed = kvckpt.keep_last(url("run"), 2)
    assert [i.namespace for i in removed] == ["run/step1", "run/step2"]
    assert sorted(k.decode() for k in raw.scan_iter(match="run/*/.metadata")) == [
        "run/step3/.metadata",
        "run/step4/.metadata",
    ]
    assert raw.dbsize() == 2 * 2
    assert kvckpt.delete(url("run/step3")) is True
    assert kvckpt.delete(url("run/step3")) is False
    stats = raw.info("commandstats")
    assert "cmdstat_keys" not in stats and "cmdstat_flushdb" not in stats
    assert stats["cmdstat_unlink"]["calls"] >= 12_000 + 2  # the data keys of step1..step3
    assert stats["cmdstat_getdel"]["calls"] >= 1  # delete reads and removes the record in one command
    assert stats["cmdstat_eval"]["calls"] >= 2  # keep_last removes a record only as it was listed
    state = small_state(0)
    kvckpt.load(state, url("run/step4"))
    assert state["step"] == 4
    assert kvckpt.keep_last(url("run"), 5) == []
    raw.close()


def test_keep_last_rejects_a_negative_count(redis_server: RedisServer, namespace: str) -> None:
    with pytest.raises(kvckpt.KVCheckpointError, match=">= 0"):
        kvckpt.keep_last(redis_server.url(namespace), -1)


def test_delete_leaves_nested_checkpoints_and_removes_rank_records(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    url = redis_server.url
    kvckpt.save(small_state(1), url(namespace))
    kvckpt.save(small_state(2), url(f"{namespace}/__9"))  # a nested checkpoint that looks rank-ish
    dcp.save(small_state(3), storage_writer=kvckpt.KVStorageWriter(url(namespace)), use_collectives=False)
    assert layout.record_key(namespace, 0) in keys_under(raw, namespace)

    assert kvckpt.delete(url(namespace)) is True
    left = keys_under(raw, namespace)
    assert left and all(k.startswith(f"{namespace}/__9/") for k in left)
    state = small_state(0)
    kvckpt.load(state, url(f"{namespace}/__9"))
    assert state["step"] == 2


def test_delete_with_a_damaged_record_still_removes_its_data(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    kvckpt.save(small_state(), redis_server.url(namespace))
    kvckpt.save(small_state(), redis_server.url(f"{namespace}/inner"))
    raw.set(layout.record_key(namespace), b"\xc1 damaged")
    assert kvckpt.delete(redis_server.url(namespace)) is True
    assert all(k.startswith(f"{namespace}/inner/") for k in keys_under(raw, namespace))
    assert kvckpt.list_checkpoints(redis_server.url(namespace))[0].namespace == f"{namespace}/inner"


# Copy ------------------------------------------------------------------------------------------


def test_copy_store_to_store_rechunks_and_commits_fresh(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    state = reference_state()
    src, dst = redis_server.url(f"{namespace}/src"), redis_server.url(f"{namespace}/dst")
    kvckpt.save(state, src, chunk_bytes=1 << 20)
    sizes: list[int] = []
    result = kvckpt.copy(src, dst, ttl=3600, progress=sizes.append)
    assert (result.source, result.destination) == (src, dst)
    assert sum(sizes) == result.nbytes and result.items == len(sizes)

    loaded = zeros_like_state(state)
    kvckpt.load(loaded, dst)
    assert_same(state, loaded)
    body = record.decode_record(cast(bytes, raw.get(layout.record_key(f"{namespace}/dst"))), "k")
    assert body["storage_meta"]["checkpoint_id"] == dst
    assert body["save_id"] != kvckpt.info(src).save_id
    assert body["num_keys"] < kvckpt.info(src).num_keys  # 1 MiB chunks became the default 4 MiB ones
    assert 0 < raw.pttl(layout.record_key(f"{namespace}/dst")) <= 3_600_000
    assert raw.pttl(layout.record_key(f"{namespace}/src")) == -1
    assert kvckpt.verify(dst).num_keys == body["num_keys"]


def test_export_loads_with_stock_filesystem_reader(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    state = folder_state()
    kvckpt.save(state, redis_server.url(namespace), chunk_bytes=1 << 20)
    result = kvckpt.copy(redis_server.url(namespace), tmp_path / "exported")
    assert result.destination == str(tmp_path / "exported")
    loaded = zeros_like_state(state)
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(tmp_path / "exported"))
    assert_same(state, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging folder left behind


def test_folder_from_stock_writer_imports_and_round_trips(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    state = folder_state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "stock"))
    kvckpt.copy(str(tmp_path / "stock"), redis_server.url(namespace))
    loaded = zeros_like_state(state)
    kvckpt.load(loaded, redis_server.url(namespace))
    assert_same(state, loaded)

    kvckpt.copy(redis_server.url(namespace), tmp_path / "again")
    again = zeros_like_state(state)
    dcp.load(again, storage_reader=dcp.FileSystemReader(tmp_path / "again"))
    assert_same(state, again)


def test_copy_reads_the_source_in_bounded_groups(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """With a tiny group size every item is fetched on its own, and the result is the same."""
    state = {f"t{i}": random_tensor((100, 100), torch.float16, seed=i) for i in range(12)}
    kvckpt.save(state, redis_server.url(namespace))
    kvckpt.copy(redis_server.url(namespace), tmp_path / "out", group_bytes=1)
    loaded = {k: torch.zeros(100, 100, dtype=torch.float16) for k in state}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(tmp_path / "out"))
    assert all(bits_equal(state[k], loaded[k]) for k in state)


def test_copy_refuses_to_clobber_and_overwrites_when_asked(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    src, dst = redis_server.url(f"{namespace}/a"), redis_server.url(f"{namespace}/b")
    kvckpt.save(small_state(1), src)
    kvckpt.save(small_state(2), dst)
    with pytest.raises(kvckpt.CheckpointExistsError):
        kvckpt.copy(src, dst)
    kvckpt.copy(src, dst, overwrite=True)
    state = small_state(0)
    kvckpt.load(state, dst)
    assert state["step"] == 1

    folder = tmp_path / "ckpt"
    kvckpt.copy(dst, folder)
    kvckpt.save(small_state(3), src, overwrite=True)
    with pytest.raises(kvckpt.CheckpointExistsError, match="overwrite"):
        kvckpt.copy(src, folder)
    kvckpt.copy(src, folder, overwrite=True)
    loaded = small_state(0)
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(folder))
    assert loaded["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(kvckpt.CheckpointExistsError, match="choose another"):
        kvckpt.copy(src, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_copy_errors(redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    with pytest.raises(kvckpt.CheckpointNotFoundError):
        kvckpt.copy(redis_server.url(namespace), tmp_path / "x")
    with pytest.raises(kvckpt.CheckpointNotFoundError, match="not a DCP checkpoint folder"):
        kvckpt.copy(tmp_path, redis_server.url(namespace))
    with pytest.raises(kvckpt.InvalidCheckpointIdError, match="local DCP folders"):
        kvckpt.copy("s3://bucket/ckpt", redis_server.url(namespace))
    kvckpt.save(small_state(), redis_server.url(namespace))
    with pytest.raises(kvckpt.KVCheckpointError, match="ttl"):
        kvckpt.copy(redis_server.url(namespace), tmp_path / "y", ttl=5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(kvckpt.CorruptCheckpointError, match="cannot be read"):
        kvckpt.copy(tmp_path / "bad", redis_server.url(f"{namespace}/z"))
    assert kvckpt.list_checkpoints(redis_server.url(f"{namespace}/z")) == []


def _save_sharded(rank: int, world: int, port: int, folder: str) -> None:
    """One rank of a 2-rank job writing a Shard(0) DTensor with stock DCP into a folder."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.arange(64 * 6, dtype=torch.float32).reshape(64, 6)
        state = {"w": distribute_tensor(full, mesh, [Shard(0)]), "step": 5}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_copy_of_a_sharded_multi_rank_checkpoint(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """Shards saved by 2 real ranks travel folder -> store -> folder and load whole on one process."""
    import torch.multiprocessing as mp

    from tests.harness.servers import free_port

    mp.spawn(  # type: ignore[no-untyped-call]
        _save_sharded, args=(2, free_port(), str(tmp_path / "ranks")), nprocs=2, join=True
    )
    expected = torch.arange(64 * 6, dtype=torch.float32).reshape(64, 6)
    kvckpt.copy(tmp_path / "ranks", redis_server.url(namespace))
    shards = [e for e in kvckpt.info(redis_server.url(namespace)).entries if e.fqn == "w"]
    assert shards[0].chunks == 2 and shards[0].shape == (64, 6)
    loaded: dict[str, Any] = {"w": torch.zeros(64, 6), "step": 0}
    kvckpt.load(loaded, redis_server.url(namespace))
    assert torch.equal(loaded["w"], expected) and loaded["step"] == 5

    kvckpt.copy(redis_server.url(namespace), tmp_path / "back")
    again: dict[str, Any] = {"w": torch.zeros(64, 6), "step": 0}
    dcp.load(again, storage_reader=dcp.FileSystemReader(tmp_path / "back"))
    assert torch.equal(again["w"], expected) and again["step"] == 5
    meta = dcp.FileSystemReader(tmp_path / "back").read_metadata().state_dict_metadata["w"]
    assert isinstance(meta, TensorStorageMetadata) and len(meta.chunks) == 2


def test_copy_between_redis_etcd_and_a_folder(
    redis_server: RedisServer, etcd_server: EtcdServer, namespace: str, tmp_path: Path
) -> None:
    """etcd's small request limit re-chunks on the way in; every hop stays bit-exact."""
    state: dict[str, Any] = {"big": random_tensor((1000, 700), torch.float32, seed=7), "step": 5}  # 2.8 MB
    src = redis_server.url(namespace)
    kvckpt.save(state, src)
    kvckpt.copy(src, etcd_server.url(namespace))
    kvckpt.copy(etcd_server.url(namespace), tmp_path / "out")
    kvckpt.copy(tmp_path / "out", redis_server.url(f"{namespace}/back"))
    for where in (etcd_server.url(namespace), redis_server.url(f"{namespace}/back")):
        loaded: dict[str, Any] = {"big": torch.zeros(1000, 700), "step": 0}
        kvckpt.load(loaded, where)
        assert bits_equal(state["big"], loaded["big"]) and loaded["step"] == 5, where
    assert [c.checkpoint_id for c in kvckpt.list_checkpoints(etcd_server.url(namespace))] == [
        etcd_server.url(namespace)
    ]


# Order: step, copies, the newest that verifies ------------------------------------------------------


def test_a_copy_keeps_its_sources_commit_time_so_it_is_not_the_latest(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    url = redis_server.url
    kvckpt.save(small_state(1), url(f"{namespace}/step1"))
    kvckpt.save(small_state(2), url(f"{namespace}/step2"))
    kvckpt.copy(url(f"{namespace}/step1"), url(f"{namespace}/step1-backup"))
    kvckpt.copy(url(f"{namespace}/step1"), tmp_path / "step1")
    kvckpt.copy(tmp_path / "step1", url(f"{namespace}/step1-roundtrip"))

    infos = {i.namespace.rsplit("/", 1)[1]: i for i in kvckpt.list_checkpoints(url(namespace))}
    assert infos["step1-backup"].created == infos["step1"].created
    assert kvckpt.latest(url(namespace)) == url(f"{namespace}/step2")
    # A copy within the store keeps its source's commit clock; one from a folder has none of this
    # store's, so it sorts before every checkpoint committed here (docs/protocol.md).
    assert [d.namespace.rsplit("/", 1)[1] for d in kvckpt.keep_last(url(namespace), 1, dry_run=True)] == [
        "step1-roundtrip",
        "step1",
        "step1-backup",
    ]
    assert infos["step1-backup"].commit_clock == infos["step1"].commit_clock is not None
    assert infos["step1-roundtrip"].commit_clock is None
    assert infos["step1-roundtrip"].created == pytest.approx(infos["step1"].created, abs=1e-3)


def test_step_orders_latest_and_keep_last_and_copies_keep_it(
    redis_server: RedisServer, namespace: str
) -> None:
    url = redis_server.url
    kvckpt.save(small_state(20), url(f"{namespace}/b"), step=20)
    kvckpt.save(small_state(3), url(f"{namespace}/a"), step=3)  # committed later, an earlier step
    kvckpt.copy(url(f"{namespace}/a"), url(f"{namespace}/c"))
    assert kvckpt.info(url(f"{namespace}/c")).step == 3
    assert [(i.namespace.rsplit("/", 1)[1], i.step) for i in kvckpt.list_checkpoints(url(namespace))] == [
        ("a", 3),
        ("c", 3),
        ("b", 20),
    ]
    assert kvckpt.latest(url(namespace)) == url(f"{namespace}/b")
    kept = kvckpt.keep_last(url(namespace), 1)
    assert [d.step for d in kept] == [3, 3]
    with pytest.raises(kvckpt.KVCheckpointError, match="step"):
        kvckpt.save(small_state(), url(f"{namespace}/bad"), step=-1)


def test_a_record_without_a_step_stays_loadable_and_sorts_first(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    url = redis_server.url
    kvckpt.save(small_state(4), url(f"{namespace}/old"))
    kvckpt.save(small_state(1), url(f"{namespace}/new"), step=1)
    key = layout.record_key(f"{namespace}/old")
    body = record.decode_record(raw.get(key), key)  # type: ignore[arg-type]
    del body["step"], body["format"], body["version"]  # as a kvckpt without steps wrote it
    raw.set(key, record.encode_record(body))
    assert [i.step for i in kvckpt.list_checkpoints(url(namespace))] == [None, 1]
    state = small_state(0)
    kvckpt.load(state, url(f"{namespace}/old"))
    assert state["step"] == 4


def test_latest_verified_skips_a_damaged_newest_checkpoint(
    redis_server: RedisServer, raw: redis.Redis, namespace: str
) -> None:
    url = redis_server.url
    for step in (1, 2, 3):
        kvckpt.save(small_state(step), url(f"{namespace}/step{step}"), step=step)
    newest = sorted(keys_under(raw, f"{namespace}/step3") - {layout.record_key(f"{namespace}/step3")})
    raw.delete(newest[0])
    assert kvckpt.latest(url(namespace)) == url(f"{namespace}/step3")
    assert kvckpt.latest(url(namespace), verify=True) == url(f"{namespace}/step2")
    for step in (1, 2):
        raw.setrange(sorted(keys_under(raw, f"{namespace}/step{step}"))[0], 0, b"\xff\xff")
    assert kvckpt.latest(url(namespace), verify=True) is None
